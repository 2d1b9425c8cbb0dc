"""`generate(model, ...)`: greedy / sampled decoding for `Qwen2VLForConditionalGeneration`.

Flow (one request = one call):
1. Resolve options (call args > `generation_config=` > `model.generation_config` > defaults) and validate the
   options and the inputs — every ValueError is raised before any model compute.
2. Run the vision tower once, expand ids/mask/vision features per returned sequence (row b*n + j).
3. Prefill with a KV cache preallocated for prompt + max_new_tokens (`logits_to_keep=1`); the cache keeps
   the per-sequence M-RoPE deltas, so decode positions need nothing more.
4. Decode one token per step through the text decoder; finished rows (EOS / stop string) are padded with
   `pad_token_id` on the device and dropped from the running batch (`KVCache.select_batch`) once the host
   learns about them (see `stopping.FinishedFlags`).
   With `compile=True` (or a torch.compile mode name) the prefilled cache is handed to a
   `model.static_decoding(...)` (model/static_decode.py) instead: static shapes, compiled step (CUDA graphs on CUDA), no rows dropped
   (finished rows keep decoding pad tokens); the loop still stops once the host sees every row finished.

Returns `(B*n, S+new)` long ids (prompt + generated, rows that stopped early padded), or a
`GenerateDecoderOnlyOutput` when `return_dict_in_generate=True`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.cache import KVCache
from ..model.outputs import ModelOutput
from .beam_search import beam_search
from .config import DEFAULT_NEW_TOKENS, GenerationConfig
from .continuation import check_continuation, prefill_continuation
from .inputs import check_prompt, encode_vision, plan_vision
from .logits import NEG_INF, LogitsPipeline, seen_tokens
from .processors import apply_processors, as_processor_list
from .stopping import FinishedFlags, StopStringChecker

_OPTION_NAMES = ("max_new_tokens", "min_new_tokens", "max_length", "min_length", "do_sample", "temperature",
                 "top_k", "top_p", "min_p", "repetition_penalty", "eos_token_id", "pad_token_id", "stop_strings",
                 "num_return_sequences", "return_dict_in_generate", "output_scores", "output_logits", "use_cache",
                 "compile", "num_beams", "length_penalty", "early_stopping", "bad_words_ids", "remove_invalid_values",
                 "output_hidden_states", "output_attentions")


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """sequences (B*n, S+new); scores / logits: one (B*n, V) float32 tensor per generated position (processed
    scores / raw logits). Rows already finished at a step hold a "pad only" row there (0 at pad_token_id, -inf
    elsewhere), since they are no longer computed."""
    sequences: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: tuple | None = None      # per step: a tuple over layers of (B*n, Hq, s_step, K)
    hidden_states: tuple | None = None   # per step: a tuple over layers (+ embeddings) of (B*n, s_step, H)
    past_key_values: KVCache | None = None  # pass back with the next turn's ids to continue without re-prefill


class StepCapture:
    """Hidden states / attentions of every forward `generate` runs (return_dict_in_generate with
    output_hidden_states / output_attentions). Rows already dropped from the running batch are zeros."""

    def __init__(self, cfg, batch: int):
        on = bool(cfg.return_dict_in_generate)
        self.want_hidden, self.want_attn = on and bool(cfg.output_hidden_states), on and bool(cfg.output_attentions)
        self.kwargs = {k: True for k, w in (("output_hidden_states", self.want_hidden),
                                           ("output_attentions", self.want_attn)) if w}
        self.batch = batch
        self._hidden, self._attn = [], []

    def add(self, out, rows: torch.Tensor | None = None) -> None:
        def full(t):
            if rows is None or t.shape[0] == self.batch:
                return t
            z = t.new_zeros(self.batch, *t.shape[1:])
            z[rows] = t
            return z

        if self.want_hidden:
            self._hidden.append(tuple(full(t) for t in out.hidden_states))
        if self.want_attn:
            self._attn.append(tuple(full(t) for t in out.attentions))

    @property
    def hidden_states(self):
        return tuple(self._hidden) if self.want_hidden else None

    @property
    def attentions(self):
        return tuple(self._attn) if self.want_attn else None


def _resolve_config(model, generation_config, options: dict) -> GenerationConfig:
    base = getattr(model, "generation_config", None)
    if base is None:
        base = GenerationConfig.from_model_config(model.config)
    if generation_config is not None and not isinstance(generation_config, (GenerationConfig, dict)):
        raise ValueError(f"generation_config must be a GenerationConfig or a dict, "
                         f"got {type(generation_config).__name__}")
    cfg = base.merged(generation_config, {k: v for k, v in options.items() if v is not None})
    cfg.validate()
    return cfg


def _new_token_budget(cfg: GenerationConfig, prompt_len: int, max_positions: int) -> int:
    if cfg.max_new_tokens is not None:
        new = cfg.max_new_tokens
    elif cfg.max_length is not None:
        new = cfg.max_length - prompt_len
        if new < 0:
            raise ValueError(f"max_length={cfg.max_length} is shorter than the prompt ({prompt_len} tokens); "
                             "set max_new_tokens instead.")
    else:
        return max(0, min(DEFAULT_NEW_TOKENS, max_positions - prompt_len))
    if prompt_len + new > max_positions:
        raise ValueError(f"The prompt ({prompt_len} tokens) plus max_new_tokens={new} exceeds the model's "
                         f"max_position_embeddings={max_positions}; shorten the prompt or lower max_new_tokens.")
    return new


def _make_generator(seed, generator, device: torch.device) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("Pass either seed or generator, not both.")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the model runs on {device}")
        return generator
    if seed is not None:
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {type(seed).__name__}")
        return torch.Generator(device=device).manual_seed(seed)
    return None


def _decode_step(model, tokens: torch.Tensor, mask: torch.Tensor | None, cache: KVCache,
                 capture: StepCapture | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """tokens (B,1) → next-token logits (B,V) float32 through the model's `decode_step` (hidden states /
    attentions recorded into `capture` when asked)."""
    logits, out = model.decode_step(tokens, cache, mask, **(capture.kwargs if capture is not None else {}))
    if capture is not None:
        capture.add(out, rows)
    return logits


def _check_unsupported(cfg, streamer) -> None:
    """One clear error naming the argument, for combinations this generate does not implement."""
    if cfg.num_beams > 1:
        for name, bad in (("do_sample", cfg.do_sample), ("streamer", streamer is not None),
                          ("stop_strings", cfg.stop_strings), ("compile", cfg.compile)):
            if bad:
                raise ValueError(f"{name} is not supported together with beam search (num_beams > 1).")
    if cfg.compile and cfg.return_dict_in_generate and (cfg.output_hidden_states or cfg.output_attentions):
        raise ValueError("output_hidden_states / output_attentions are not supported with compile=True.")


def generate(model, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
             pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None, max_new_tokens=None,
             min_new_tokens=None, do_sample=None, temperature=None, top_k=None, top_p=None, min_p=None,
             repetition_penalty=None, eos_token_id=None, pad_token_id=None, stop_strings=None, tokenizer=None,
             num_return_sequences=None, generation_config=None, streamer=None, seed=None, generator=None,
             return_dict_in_generate=None, output_scores=None, output_logits=None, use_cache=None,
             max_length=None, min_length=None, compile=None, num_beams=None, length_penalty=None,
             early_stopping=None, bad_words_ids=None, remove_invalid_values=None, output_hidden_states=None,
             output_attentions=None, past_key_values=None, logits_processor=None, **kwargs):
    """Generate continuations of left-padded prompts `input_ids (B,S)`; see the module docstring.

    `mm_token_type_ids` is accepted and ignored (placeholders are found from the ids). `use_cache=False` is
    accepted for API compatibility; the KV cache is always used (same tokens, far less compute).
    `past_key_values`: the cache a previous call returned (`return_dict_in_generate=True`): `input_ids` is then
    the whole conversation and only its uncached part is prefilled (see `continuation.py`).
    `logits_processor`: callables `(input_ids (R, L), scores (R, V)) -> scores` (see `processors`)."""
    if kwargs:
        raise TypeError(f"generate() got unexpected arguments: {sorted(kwargs)}")
    options = dict(locals())
    cfg = _resolve_config(model, generation_config, {k: options[k] for k in _OPTION_NAMES})
    _check_unsupported(cfg, streamer)
    eos = cfg.eos_token_ids
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    mask = check_prompt(input_ids, attention_mask, cfg.pad_token_id, eos)
    n = cfg.num_return_sequences
    past = None
    if past_key_values is not None:
        if cfg.num_beams > 1 or (cfg.return_dict_in_generate and (cfg.output_hidden_states or cfg.output_attentions)):
            raise ValueError("past_key_values cannot be combined with beam search or output_hidden_states / "
                             "output_attentions.")
        past = check_continuation(past_key_values, input_ids, mask, n, cfg.compile)
    b0, s = input_ids.shape
    text_cfg = model.config.text_config
    max_new = _new_token_budget(cfg, s, text_cfg.max_position_embeddings)
    if streamer is not None and b0 * n != 1:
        raise ValueError(f"Streaming supports a single sequence; got batch size {b0} x num_return_sequences {n}.")
    stopper = StopStringChecker(cfg.stop_strings, tokenizer) if cfg.stop_strings else None
    plan = plan_vision(model.config, input_ids, mask, pixel_values, image_grid_thw, pixel_values_videos,
                       video_grid_thw)
    device = model.device
    gen = _make_generator(seed, generator, device) if cfg.do_sample else None
    procs = as_processor_list(logits_processor)
    if procs and cfg.num_beams > 1:
        raise ValueError("logits_processor is not supported together with beam search (num_beams > 1).")

    with torch.no_grad():
        return _run(model, cfg, input_ids.to(device).long(), mask.to(device), plan, n, max_new, pad, eos,
                    stopper, streamer, gen, procs, dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                                 pixel_values_videos=pixel_values_videos,
                                                 video_grid_thw=video_grid_thw), (past_key_values, past))


class _Running:
    """The rows still being decoded: running row i writes output row `rows[i]`. Per-row state lives on the
    device (`finished (R,)`, `mask (R, S+new)`, `seen (R,V)` for the repetition penalty); `has_pad` and the
    stop-string `tails` are host lists."""

    def __init__(self, b, s, max_new, mask, seen, tails, device):
        self.rows = torch.arange(b, device=device)
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)
        self.mask = torch.ones(b, s + max_new, dtype=torch.long, device=device)
        self.mask[:, :s] = mask
        self.has_pad = (mask == 0).any(-1).tolist()
        self.seen, self.tails = seen, tails

    def keep(self, keep: list[int], cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Drop every row not listed in `keep` (from here and from the cache); returns `tokens` of the kept rows."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.rows.device)
        cache.select_batch(idx)
        self.rows, self.finished, self.mask = self.rows[idx], self.finished[idx], self.mask[idx]
        self.seen = None if self.seen is None else self.seen[idx]
        self.tails = None if self.tails is None else [self.tails[i] for i in keep]
        self.has_pad = [self.has_pad[i] for i in keep]
        return tokens[idx]


def _record(store: list, value: torch.Tensor, run: _Running, pad_row: torch.Tensor, b: int) -> None:
    """Append one step's (R,V) scores as a (B,V) tensor; finished rows get the "pad only" row."""
    full = pad_row.expand(b, -1).clone()
    full[run.rows] = torch.where(run.finished[:, None], pad_row, value)
    store.append(full)


def _run(model, cfg, ids, mask, plan, n, max_new, pad, eos, stopper, streamer, gen, procs, media,
         cont=(None, None)):
    device, s = ids.device, ids.shape[1]
    vocab = model.config.text_config.vocab_size
    if streamer is not None:
        streamer.put(ids.cpu())
    beams = cfg.num_beams if cfg.num_beams > 1 else 0
    n = beams or n  # beam search runs num_beams rows per sample and returns num_return_sequences of them
    if n > 1:
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    b = ids.shape[0]
    if max_new == 0:
        if streamer is not None:
            streamer.end()
        return _finish(cfg, ids if not beams else ids[::beams].repeat_interleave(cfg.num_return_sequences, 0), (),
                       ())

    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    pipeline = LogitsPipeline(cfg, eos_t, max(cfg.min_new_tokens or 0, (cfg.min_length or 0) - s), vocab)
    capture = StepCapture(cfg, b)
    if beams:
        return beam_search(model, cfg, ids, mask, encode_vision(model, plan, n, **media), max_new, cfg.pad_token_id,
                           eos, pipeline, capture)
    static = None  # the StaticDecoder (compile mode) holds the decode-time cache; the prefill needs s slots
    cache, past = cont
    if cache is None:
        cache = model.new_cache(b, s if cfg.compile else s + max_new)
    else:
        cache.reserve(s + max_new)
    out = torch.full((b, s + max_new), pad, dtype=torch.long, device=device)
    out[:, :s] = ids
    run = _Running(b, s, max_new, mask, seen_tokens(ids, mask, vocab) if pipeline.uses_penalty else None,
                   stopper.start(ids, mask) if stopper else None, device)
    steps_with_work = torch.zeros((), dtype=torch.long, device=device)
    flags = FinishedFlags(device, eager=streamer is not None or stopper is not None, batch_size=b)
    want_scores = cfg.return_dict_in_generate and cfg.output_scores
    want_logits = cfg.return_dict_in_generate and cfg.output_logits
    all_scores, all_logits = [], []
    pad_row = torch.full((vocab,), NEG_INF, device=device)
    if pad < vocab:
        pad_row[pad] = 0.0

    try:
        if past is not None:
            logits = prefill_continuation(model, ids, cache, past, media)
        else:
            vision = encode_vision(model, plan, n, **media)
            prefill = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                            logits_to_keep=1, **capture.kwargs, **vision)
            capture.add(prefill)
            logits = prefill.logits[:, -1].float()
        if cfg.compile and max_new > 1:
            mode = cfg.compile if isinstance(cfg.compile, str) else "reduce-overhead"
            static = model.static_decoding(b, s + max_new, compile=True, mode=mode)
            static.adopt(cache, mask)
            cache = None
        for step in range(max_new):
            custom = apply_processors(procs, out[run.rows, :s + step], logits) if procs else logits
            scores = pipeline(custom, run.seen, step, lambda: out[run.rows, :s + step])
            tokens = torch.where(run.finished, pad, pipeline.select(scores, gen))
            steps_with_work += (~run.finished).any()
            if want_scores:
                _record(all_scores, scores, run, pad_row, b)
            if want_logits:
                _record(all_logits, logits, run, pad_row, b)
            out[run.rows, s + step] = tokens
            if run.seen is not None:
                run.seen.scatter_(1, tokens[:, None], True)
            run.finished = run.finished | (tokens[:, None] == eos_t).any(-1)
            if streamer is not None:
                streamer.put(tokens.cpu())
            if stopper is not None:
                hit = stopper.update(run.tails, tokens.tolist())
                if any(hit):
                    run.finished = run.finished | torch.tensor(hit, device=device)
            if step == max_new - 1:
                break
            done = flags.poll(run.finished)
            if done is not None and all(done):
                break
            if done is not None and any(done) and static is None:
                tokens = run.keep([i for i, d in enumerate(done) if not d], cache, tokens)
            flags.submit(run.finished)
            if static is not None:
                logits = static.step(tokens[:, None])
                continue
            step_mask = run.mask[:, :s + step + 1] if any(run.has_pad) else None
            logits = _decode_step(model, tokens[:, None], step_mask, cache, capture, run.rows)
    finally:
        if streamer is not None:
            streamer.end()
    new = int(steps_with_work)
    return _finish(cfg, out[:, :s + new], tuple(all_scores[:new]), tuple(all_logits[:new]), capture, cache)


def _finish(cfg, sequences, scores, logits, capture: StepCapture | None = None, cache=None):
    if not cfg.return_dict_in_generate:
        return sequences
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores if cfg.output_scores else None,
                                     logits=logits if cfg.output_logits else None,
                                     hidden_states=capture.hidden_states if capture else None,
                                     attentions=capture.attentions if capture else None, past_key_values=cache)
