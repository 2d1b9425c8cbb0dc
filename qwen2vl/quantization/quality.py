"""How close a quantized model's next-token predictions stay to the full-precision model's: mean KL divergence
KL(p_ref || p_quant) and top-1 agreement over every position of a fixed prompt set (teacher forcing, so each
position is one next-token decision). Used by tests/test_quantization_int4.py and benchmarks/bench_int4.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F

EVAL_TEXTS = (  # distinct from the calibration texts (awq.CALIBRATION_TEXTS)
    "<|im_start|>user\nWhat shape is this?<|im_end|>\n<|im_start|>assistant\nIt is a blue square.<|im_end|>",
    "<|im_start|>user\nHow many circles are there?<|im_end|>\n<|im_start|>assistant\nThere are 2 circles.<|im_end|>",
    "<|im_start|>user\nWhere is the red shape?<|im_end|>\n<|im_start|>assistant\nThe red shape is in the top "
    "left.<|im_end|>",
    "<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n3 shapes: a green triangle, a "
    "yellow circle and a red square.<|im_end|>",
    "A library is a collection of books and other media, organised so that people can find what they need and "
    "borrow it for a while before bringing it back.",
    "for i in range(3):\n    print(i * i)\n# prints 0, 1 and 4 on separate lines",
)


@torch.no_grad()
def next_token_agreement(ref_model, quant_model, prompts: list[torch.Tensor | dict]) -> dict[str, float]:
    """{"kl": mean KL(ref || quant) in nats, "top1": fraction of positions whose argmax agrees, "positions"}.
    A prompt is input_ids (1, T), or the model's keyword arguments for one sequence with pictures (a processor's
    output, `image_prompts`): then only positions whose input is not a vision placeholder count."""
    kls, agree, n = [], 0, 0
    for p in prompts:
        kw = dict(p) if isinstance(p, dict) else {"input_ids": p}
        ids = kw["input_ids"]
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        for name in ("image_token_id", "video_token_id"):
            if isinstance(p, dict) and getattr(ref_model.config, name, None) is not None:
                keep &= ids[0] != getattr(ref_model.config, name)
        lr = ref_model(**kw, use_cache=False).logits[0].float()[keep]
        lq = quant_model(**kw, use_cache=False).logits[0].float()[keep]
        lp_r, lp_q = F.log_softmax(lr, -1), F.log_softmax(lq, -1)
        kls.append((lp_r.exp() * (lp_r - lp_q)).sum(-1))
        agree += int((lr.argmax(-1) == lq.argmax(-1)).sum())
        n += lr.shape[0]
    return {"kl": float(torch.cat(kls).mean()), "top1": agree / max(n, 1), "positions": n}


def eval_ids(tokenizer) -> list[torch.Tensor]:
    return [torch.tensor([tokenizer.encode(t)]) for t in EVAL_TEXTS]


def image_prompts(processor, pictures_and_qa) -> list[dict]:
    """Model inputs for `next_token_agreement` from (PIL picture, question, answer) triples: one user turn with the
    picture and question and the answer as the assistant's turn (teacher forcing through the answer too)."""
    out = []
    for picture, question, answer in pictures_and_qa:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        text = processor.apply_chat_template(messages, tokenize=False)
        out.append(dict(processor(text=[text], images=[picture], return_tensors="pt")))
    return out


@torch.no_grad()
def decode_agreement(ref_model, quant_model, prompts: list[torch.Tensor]) -> dict[str, float]:
    """`next_token_agreement` with the quantized model fed one token at a time through its KV cache, so its
    projections run the few-rows (decoding) kernels `choose` picks, not the prefill path."""
    kls, agree, n = [], 0, 0
    for ids in prompts:
        lr = ref_model(input_ids=ids, use_cache=False).logits[0].float()
        out, steps = None, []
        for t in range(ids.shape[1]):
            out = quant_model(input_ids=ids[:, t:t + 1], use_cache=True,
                              past_key_values=None if out is None else out.past_key_values)
            steps.append(out.logits[0, -1].float())
        lq = torch.stack(steps)
        lp_r, lp_q = F.log_softmax(lr, -1), F.log_softmax(lq, -1)
        kls.append((lp_r.exp() * (lp_r - lp_q)).sum(-1))
        agree += int((lr.argmax(-1) == lq.argmax(-1)).sum())
        n += lr.shape[0]
    return {"kl": float(torch.cat(kls).mean()), "top1": agree / max(n, 1), "positions": n}
