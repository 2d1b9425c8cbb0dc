"""Supervised fine-tuning loop: AdamW, warmup + cosine/linear decay, gradient accumulation (token-weighted),
clipping, optional gradient checkpointing and freezing, periodic evaluation, checkpoints, tqdm progress.

``Trainer(model, processor, args, train_dataset, eval_dataset).train()``; datasets are sequences of
``{"messages": [...]}`` records (see ``training.data``).
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..lora import apply_lora, is_peft_model
from .data import IGNORE_INDEX, SFTCollator, split_prompt_answer


@dataclass
class TrainingArguments:
    output_dir: str | None = None          # checkpoints go here (None: no saving)
    num_train_epochs: float = 1.0
    max_steps: int = -1                     # > 0 overrides num_train_epochs (optimizer steps)
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0              # <= 0: no clipping
    lr_scheduler_type: str = "cosine"       # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0               # used when warmup_steps == 0
    min_lr_ratio: float = 0.0               # floor of the decay, as a fraction of learning_rate
    logging_steps: int = 10
    eval_steps: int = 0                     # 0: evaluate only at the end (when an eval set is given)
    eval_generate: bool = False             # exact-match accuracy with greedy generate()
    eval_max_new_tokens: int = 64
    save_steps: int = 0                     # 0: save only at the end
    seed: int = 0
    gradient_checkpointing: bool = False
    freeze_vision_tower: bool = False
    freeze_merger: bool = False
    freeze_language_model: bool = False
    max_length: int | None = None           # drop longer conversations
    bf16: bool = False                      # autocast to bfloat16 (weights stay in their dtype)
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True
    processor_kwargs: dict = field(default_factory=dict)
    # LoRA (PEFT): rank > 0 wraps the model with `qwen2vl.lora.apply_lora`; only adapters train, and checkpoints
    # are PEFT adapter folders (adapter_config.json + adapter_model.safetensors) plus the processor files.
    lora_r: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target: list | None = None         # text projection names (default: all seven)
    lora_vision: bool = False               # also the ViT linears and the merger

    def to_dict(self) -> dict:
        return asdict(self)


def freeze(model, vision_tower: bool = False, merger: bool = False, language_model: bool = False) -> None:
    """requires_grad=False on the ViT (patch embed + blocks), the PatchMerger and/or the decoder + LM head."""
    visual = model.model.visual
    groups = []
    if vision_tower:
        groups += [visual.patch_embed, visual.blocks]
    if merger:
        groups.append(visual.merger)
    if language_model:
        groups += [model.model.language_model, model.lm_head]
    for g in groups:
        for p in g.parameters():
            p.requires_grad_(False)


def lr_factor(step: int, total: int, warmup: int, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown lr_scheduler_type {kind!r} (cosine, linear, constant)")
    return min_ratio + (1.0 - min_ratio) * decay


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, model, processor, args: TrainingArguments, train_dataset=None, eval_dataset=None,
                 collator: SFTCollator | None = None, eval_collator: SFTCollator | None = None):
        self.model, self.processor, self.args = model, processor, args
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.collator = collator or SFTCollator(processor, args.max_length, args.processor_kwargs)
        self.eval_collator = eval_collator or self.collator
        self.device = _device(args.device)
        self.history: list[dict] = []
        self.global_step = 0

    # ------------------------------------------------------------------------------------------ helpers
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16)

    def _to_device(self, batch):
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _loader(self, dataset, batch_size: int, shuffle: bool, seed: int = 0, collate=None):
        g = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g,
                                           collate_fn=collate or self.collator, num_workers=self.args.num_workers)

    def create_optimizer(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.args.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                                 eps=self.args.adam_epsilon, fused=fused)

    def compute_loss(self, model, batch: dict, num_items_in_batch: int) -> torch.Tensor:
        """Loss of one micro-batch: the sum of its label tokens' cross-entropy / ``num_items_in_batch`` (the label
        tokens of the whole accumulation group), so accumulated gradients equal the big batch's. Override to add
        terms (extra batch keys the collator adds are yours to pop here)."""
        return model(**batch, num_items_in_batch=num_items_in_batch).loss

    # ------------------------------------------------------------------------------------------ train
    def prepare(self, total: int):
        """Make the model trainable for ``total`` optimizer steps: LoRA wrapping, freezing, gradient checkpointing,
        train mode, ``self.optimizer`` and ``self.lr_scheduler``. ``train()`` calls it; a loop of its own (a
        benchmark timing two set-ups on the same batches) calls it once, then ``training_step`` per step."""
        a = self.args
        model = self.model.to(self.device)
        if a.lora_r > 0:
            if not is_peft_model(model):
                model = self.model = apply_lora(model, r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout,
                                                targets=a.lora_target, vision=a.lora_vision)
        freeze(model, a.freeze_vision_tower, a.freeze_merger, a.freeze_language_model)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("every parameter is frozen; nothing to train")
        if a.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        warmup = a.warmup_steps or int(round(a.warmup_ratio * total))
        self.optimizer = self.create_optimizer()
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, a.lr_scheduler_type, a.min_lr_ratio))
        return model

    def training_step(self, group: list[dict]) -> tuple[float, float | None, int]:
        """One optimizer step over the micro-batches of one accumulation ``group`` (collated batches):
        (summed loss, gradient norm before clipping or None, attended tokens)."""
        a, model = self.args, self.model
        n_items = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group)
        loss_sum, tokens = 0.0, 0
        for batch in group:
            batch = self._to_device(batch)
            with self._autocast():
                loss = self.compute_loss(model, batch, max(1, n_items))
            loss.backward()
            loss_sum += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        grad_norm = None
        if a.max_grad_norm and a.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], a.max_grad_norm))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return loss_sum, grad_norm, tokens

    def train(self) -> dict:
        a = self.args
        if self.train_dataset is None or len(self.train_dataset) == 0:
            raise ValueError("train() needs a non-empty train_dataset")
        random.seed(a.seed)
        torch.manual_seed(a.seed)
        loader = self._loader(self.train_dataset, a.per_device_train_batch_size, True, a.seed)
        per_epoch = max(1, len(loader) // a.gradient_accumulation_steps)
        total = a.max_steps if a.max_steps > 0 else max(1, math.ceil(per_epoch * a.num_train_epochs))
        model = self.prepare(total)
        sched = self.lr_scheduler
        bar = _progress(total, a.progress)
        t0 = time.perf_counter()
        tokens = 0
        window = {"loss": 0.0, "n": 0, "tokens": 0, "t": t0}
        micro = _micro_batches(loader)
        while self.global_step < total:
            loss_sum, grad_norm, n_tok = self.training_step([next(micro) for _ in range(a.gradient_accumulation_steps)])
            tokens += n_tok
            window["tokens"] += n_tok
            window["loss"] += loss_sum
            window["n"] += 1
            now = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}",
                            tok_s=f"{window['tokens'] / max(now - window['t'], 1e-9):.0f}")
            if self.global_step % max(1, a.logging_steps) == 0 or self.global_step == total:
                rec = {"step": self.global_step, "loss": window["loss"] / window["n"],
                       "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens_per_s": window["tokens"] / max(now - window["t"], 1e-9), "elapsed_s": now - t0}
                self.history.append(rec)
                window = {"loss": 0.0, "n": 0, "tokens": 0, "t": now}
            if self.eval_dataset is not None and a.eval_steps > 0 and self.global_step % a.eval_steps == 0 \
                    and self.global_step < total:
                self._log_eval(bar)
            if a.output_dir and a.save_steps > 0 and self.global_step % a.save_steps == 0 \
                    and self.global_step < total:
                self.save(os.path.join(a.output_dir, f"checkpoint-{self.global_step}"))
        bar.close()
        elapsed = time.perf_counter() - t0
        result = {"steps": self.global_step, "train_time_s": elapsed, "tokens": tokens,
                  "tokens_per_s": tokens / max(elapsed, 1e-9),
                  "final_loss": self.history[-1]["loss"] if self.history else None}
        if a.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        if self.eval_dataset is not None:
            result["eval"] = self._log_eval(bar)
        if a.output_dir:
            self.save(a.output_dir)
        model.eval()
        return result

    def _log_eval(self, bar) -> dict:
        metrics = self.evaluate()
        self.history.append({"step": self.global_step, **{f"eval_{k}": v for k, v in metrics.items()}})
        bar.write(f"step {self.global_step}: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        return metrics

    # ------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, dataset=None) -> dict:
        """loss (token mean), token_accuracy, and sequence_accuracy: the fraction of records whose every answer
        token is the argmax given the gold prefix, which is exactly when greedy decoding reproduces the answer.
        With ``eval_generate``: ``exact_match`` from real greedy ``generate`` calls."""
        dataset = self.eval_dataset if dataset is None else dataset
        model, was_training = self.model, self.model.training
        model.eval()
        loss_sum, n_tok, n_correct, n_seq, n_seq_ok = 0.0, 0, 0, 0, 0
        for batch in self._loader(dataset, self.args.per_device_eval_batch_size, False, collate=self.eval_collator):
            batch = self._to_device(batch)
            with self._autocast():
                out = model(**batch, use_cache=False)
            logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
            mask = labels != IGNORE_INDEX
            loss_sum += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            hit = (logits.argmax(-1) == labels) | ~mask
            n_tok += int(mask.sum())
            n_correct += int((hit & mask).sum())
            n_seq += labels.shape[0]
            n_seq_ok += int(hit.all(-1).sum())
        metrics = {"loss": loss_sum / max(1, n_tok), "token_accuracy": n_correct / max(1, n_tok),
                   "sequence_accuracy": n_seq_ok / max(1, n_seq)}
        if self.args.eval_generate:
            metrics["exact_match"] = self.generate_accuracy(dataset)
        model.train(was_training)
        return metrics

    @torch.no_grad()
    def generate_accuracy(self, dataset) -> float:
        """Exact match (stripped) of greedy answers to each record's final assistant turn."""
        ok = n = 0
        bs = self.args.per_device_eval_batch_size
        for i in range(0, len(dataset), bs):
            pairs = [split_prompt_answer(dataset[j]) for j in range(i, min(i + bs, len(dataset)))]
            answers = generate_answers(self.model, self.eval_collator, [p for p, _ in pairs],
                                       self.args.eval_max_new_tokens, self.device)
            ok += sum(a.strip() == g.strip() for a, (_, g) in zip(answers, pairs))
            n += len(pairs)
        return ok / max(1, n)

    # ------------------------------------------------------------------------------------------ save
    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if hasattr(self.processor, "save_pretrained"):
            self.processor.save_pretrained(directory)
        return directory


@torch.no_grad()
def generate_answers(model, collator: SFTCollator, prompts: list[dict], max_new_tokens: int = 64,
                     device=None) -> list[str]:
    """Greedy answers for records that end with a user turn (batched, left padding)."""
    texts, images, videos = collator.texts_and_media(prompts, add_generation_prompt=True)
    tok = collator.tokenizer
    side = getattr(tok, "padding_side", "left")
    tok.padding_side = "left"
    try:
        inputs = collator.encode(texts, images, videos)
    finally:
        tok.padding_side = side
    device = device or model.device
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return tok.batch_decode(new, skip_special_tokens=True)


def _micro_batches(loader):
    while True:  # epochs until the step budget is used
        yield from loader


class _NoBar:
    def update(self, *_):
        pass

    def set_postfix(self, **_):
        pass

    def write(self, s):
        print(s, flush=True)

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
