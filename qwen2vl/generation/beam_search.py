"""Beam search for `generate(num_beams > 1)`, with the semantics of transformers 5.24's vectorized beam search,
so the same model gives the same sequences:

* each step, log-softmax of the logits goes through the logits processors, is added to the running beam scores,
  and the top `max(2, 1 + n_eos) * num_beams` candidates over (num_beams x vocab) are kept per sample;
* the best `num_beams` candidates that do not stop (EOS or the length limit) keep running;
* candidates that stop while ranked within the first `num_beams` become finished hypotheses, scored
  `sum log p / generated_len ** length_penalty`; the `num_beams` best finished ones are kept;
* `early_stopping`: True stops a sample once it has num_beams finished hypotheses; False / "never" stop when the
  best running beam (its score over the current / maximal length) cannot beat the worst finished one.

Shapes: B samples, K = num_beams, rows of the model batch are b*K + k; sequences (B,K,S+max_new).
The KV cache rows are reordered each step (`KVCache.select_batch`) to follow the surviving beams.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.outputs import ModelOutput
from .logits import seen_tokens

_MASKED = -1.0e9  # the reference's "impossible" score (finite, so sums stay ordered)


@dataclass
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """sequences (B*n, S+new); sequences_scores (B*n,) length-normalised (output_scores); scores / logits: one
    (B*K, V) per step; beam_indices (B*n, new) the model row each token came from; hidden_states /
    attentions: one tuple over layers per step."""
    sequences: torch.Tensor | None = None
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B,N,...) rows picked by idx (B,M) → (B,M,...)."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return t.gather(1, idx.expand(*idx.shape[:2], *t.shape[2:]))


class _Beams:
    """All per-sample beam state on the device (see the module docstring)."""

    def __init__(self, ids: torch.Tensor, k: int, max_new: int, fill: int):
        rows, s = ids.shape
        b, dev = rows // k, ids.device
        self.b, self.k, self.s = b, k, s
        self.running = torch.full((b, k, s + max_new), fill, dtype=torch.long, device=dev)
        self.running[:, :, :s] = ids.view(b, k, s)
        self.sequences = self.running.clone()
        self.run_scores = torch.zeros(b, k, device=dev)
        self.run_scores[:, 1:] = _MASKED          # all beams start equal: only the first may expand at step 0
        self.fin_scores = torch.full((b, k), _MASKED, device=dev)
        self.finished = torch.zeros(b, k, dtype=torch.bool, device=dev)
        self.improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
        self.run_origin = torch.full((b, k, max_new), -1, dtype=torch.long, device=dev)
        self.fin_origin = self.run_origin.clone()

    def step(self, log_probs: torch.Tensor, cur: int, eos: torch.Tensor, max_len: int, cfg) -> torch.Tensor:
        """log_probs (B*K,V) processed → advance one token; returns the model rows (B*K,) the new beams
        continue (to reorder the cache) and whether every top candidate stopped."""
        b, k, s = self.b, self.k, self.s
        vocab = log_probs.shape[-1]
        keep = max(2, 1 + eos.numel()) * k
        acc = (log_probs.view(b, k, vocab) + self.run_scores[:, :, None]).view(b, k * vocab)
        top_scores, top_idx = torch.topk(acc, keep)
        beam, tok = top_idx // vocab, top_idx % vocab
        top_seq = _gather(self.running, beam)
        top_seq[:, :, cur] = tok
        top_origin = _gather(self.run_origin, beam)
        top_origin[:, :, cur - s] = beam + torch.arange(b, device=beam.device)[:, None] * k
        stops = torch.isin(tok, eos) | (cur + 1 >= max_len)

        running_scores = top_scores + stops.float() * _MASKED
        best = torch.topk(running_scores, k).indices
        self.running, self.run_scores = _gather(top_seq, best), _gather(running_scores, best)
        self.run_origin = _gather(top_origin, best)

        just = stops & (torch.arange(keep, device=tok.device) < k)[None]
        cand = top_scores / ((cur + 1 - s) ** cfg.length_penalty)
        full = self.finished.all(-1, keepdim=True) & (cfg.early_stopping is True)
        cand = cand + full.float() * _MASKED + (~self.improvable).float() * _MASKED + (~just).float() * _MASKED
        merged = torch.cat([self.fin_scores, cand], 1)
        pick = torch.topk(merged, k).indices
        self.sequences = _gather(torch.cat([self.sequences, top_seq], 1), pick)
        self.fin_scores = _gather(merged, pick)
        self.fin_origin = _gather(torch.cat([self.fin_origin, top_origin], 1), pick)
        self.finished = _gather(torch.cat([self.finished, just], 1), pick)
        self._update_improvable(cur + 1, max_len, cfg)
        return self.run_origin[:, :, cur - s].reshape(-1), bool(stops.all())

    def _update_improvable(self, cur: int, max_len: int, cfg) -> None:
        lp = cfg.length_penalty
        length = (max_len if cfg.early_stopping == "never" and lp > 0.0 else cur) - self.s
        best_running = self.run_scores[:, :1] / (length ** lp)
        worst_finished = torch.where(self.finished, self.fin_scores.min(1, keepdim=True).values, _MASKED)
        self.improvable = self.improvable & (best_running > worst_finished).any(-1, keepdim=True)

    def done(self, early_stopping, all_stopped: bool) -> bool:
        all_full = bool(self.finished.all()) and early_stopping is True
        return not bool(self.improvable.any()) or all_full or all_stopped

    def result(self, n: int):
        seqs = self.sequences[:, :n].reshape(self.b * n, -1)
        scores = self.fin_scores[:, :n].reshape(-1)
        origin = self.fin_origin[:, :n].reshape(self.b * n, -1)
        new = int((origin >= 0).sum(1).max())
        return seqs[:, :self.s + new], scores, origin[:, :new]


def beam_search(model, cfg, ids, mask, vision: dict, max_new: int, pad: int | None, eos: list[int], pipeline,
                capture) -> torch.Tensor | GenerateBeamDecoderOnlyOutput:
    """ids / mask (B*K,S) on the device, each sample repeated K = num_beams times; `vision` the prefill's
    vision kwargs for those rows; `capture` a generate.StepCapture collecting hidden states / attentions."""
    k, device = cfg.num_beams, ids.device
    rows, s = ids.shape
    text_cfg = model.config.text_config
    vocab = text_cfg.vocab_size
    max_len = s + max_new
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    fill = (pad if pad else eos[0]) if eos else (pad or 0)   # as the reference: a pad id of 0 fills with EOS
    beams = _Beams(ids, k, max_new, fill)
    full_mask = torch.cat([mask, torch.ones(rows, max_new, dtype=mask.dtype, device=device)], 1)
    cache = model.new_cache(rows, max_len)
    all_scores, all_logits = [], []
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1,
                **capture.kwargs, **vision)
    capture.add(out)
    logits = out.logits[:, -1].float()
    cur = s
    has_pad = bool((mask == 0).any())
    while True:
        flat = beams.running.view(rows, -1)[:, :cur]
        seen = seen_tokens(flat, full_mask[:, :cur], vocab) if pipeline.uses_penalty else None
        log_probs = pipeline(torch.log_softmax(logits, -1), seen, cur - s, lambda: flat)
        if cfg.output_scores:
            all_scores.append(log_probs.clone())
        if cfg.output_logits:
            all_logits.append(logits.clone())
        origin, all_stopped = beams.step(log_probs, cur, eos_t, max_len, cfg)
        cur += 1
        if beams.done(cfg.early_stopping, all_stopped) or cur >= max_len:
            break
        cache.select_batch(origin)
        tokens = beams.running.view(rows, -1)[:, cur - 1:cur]
        logits, out = model.decode_step(tokens, cache, full_mask[:, :cur] if has_pad else None, **capture.kwargs)
        capture.add(out)
    seqs, seq_scores, origin = beams.result(cfg.num_return_sequences)
    if not cfg.return_dict_in_generate:
        return seqs
    return GenerateBeamDecoderOnlyOutput(
        sequences=seqs, sequences_scores=seq_scores if cfg.output_scores else None,
        scores=tuple(all_scores) if cfg.output_scores else None,
        logits=tuple(all_logits) if cfg.output_logits else None, beam_indices=origin,
        hidden_states=capture.hidden_states, attentions=capture.attentions)
