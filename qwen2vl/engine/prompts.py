"""Prompt → token ids + vision inputs for the engine (`ProcessedPrompt`).

Accepted prompts:
* a conversation: list of message dicts (`{"role", "content"}`, content blocks may name images/videos in the
  HF or OpenAI `image_url` / `video_url` form) → chat template with the generation prompt;
* `{"messages": [...], "chat_template_kwargs": {...}}` → same;
* a string → raw prompt text (no template); `{"prompt": str, "multi_modal_data": {"image": ..., "video": ...}}`
  → raw text with `<|image_pad|>` / `<|video_pad|>` placeholders expanded by the processor;
* `{"prompt_token_ids": [...], "pixel_values": ..., "image_grid_thw": ..., ...}` → used as given (no processor
  needed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..vision_inputs import check_media, check_placeholders
from .sequence import MultiModalInputs, RequestRejected
from .vision_cache import media_hashes

_MM_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass
class ProcessedPrompt:
    token_ids: list[int]
    mm: MultiModalInputs
    prompt: Any = None  # the text prompt (rendered chat template) when there is one


def _is_conversation(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, dict) and "role" in m for m in x)


def _mm_from(d: dict) -> MultiModalInputs:
    vals = {k: (torch.as_tensor(d[k]) if d.get(k) is not None else None) for k in _MM_KEYS}
    return MultiModalInputs(**vals)


class InputProcessor:
    def __init__(self, processor, model_config):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor) if processor is not None else None
        self.image_token_id = model_config.image_token_id
        self.video_token_id = model_config.video_token_id
        vc = model_config.vision_config
        self.merge = vc.spatial_merge_size
        self.row_width = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2  # values per patch row

    def _need_processor(self, what: str):
        if self.processor is None:
            raise RequestRejected(f"{what} prompts need a processor/tokenizer; this engine has none "
                                  "(pass prompt_token_ids instead).")
        return self.processor

    def process(self, prompt: Any, *, media_limits=None) -> ProcessedPrompt:
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        if _is_conversation(prompt):
            prompt = {"messages": list(prompt)}
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, dict):
            raise RequestRejected(f"Unsupported prompt type {type(prompt).__name__}: pass a conversation (list of "
                                  "messages), a string, or a dict with 'prompt' / 'prompt_token_ids' / 'messages'.")
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else [int(t) for t in ids]
            src = prompt.get("multi_modal_inputs", prompt)
            pp = ProcessedPrompt(ids, _mm_from(src), prompt.get("prompt"))
        elif "messages" in prompt:
            proc = self._need_processor("Chat")
            kw = dict(prompt.get("chat_template_kwargs") or {})
            text = proc.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=False, **kw)
            feats = proc.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True, return_tensors="pt", media_limits=media_limits, **kw)
            pp = ProcessedPrompt(feats["input_ids"][0].tolist(), _mm_from(feats), text)
        elif "prompt" in prompt:
            proc = self._need_processor("Text")
            mm = prompt.get("multi_modal_data") or {}
            if set(mm) - {"image", "video"}:
                raise RequestRejected(f"multi_modal_data keys must be 'image' / 'video', got {sorted(mm)}.")
            if self.processor is self.tokenizer or not mm:
                ids = self.tokenizer(prompt["prompt"])["input_ids"]
                ids = ids[0] if ids and isinstance(ids[0], list) else ids
                pp = ProcessedPrompt(list(ids), MultiModalInputs(), prompt["prompt"])
            else:
                feats = proc(text=prompt["prompt"], images=mm.get("image"), videos=mm.get("video"),
                             return_tensors="pt", media_limits=media_limits)
                pp = ProcessedPrompt(feats["input_ids"][0].tolist(), _mm_from(feats), prompt["prompt"])
        else:
            raise RequestRejected("A prompt dict needs 'messages', 'prompt' or 'prompt_token_ids'.")
        self.check(pp)
        # Content hashes, once, here on the processing thread: they key the vision and KV prefix caches.
        pp.mm.image_hashes = media_hashes(pp.mm.pixel_values, pp.mm.image_grid_thw)
        pp.mm.video_hashes = media_hashes(pp.mm.pixel_values_videos, pp.mm.video_grid_thw)
        return pp

    def check(self, pp: ProcessedPrompt) -> None:
        """Pixels must match their grids, and placeholder tokens the grids (else the model would fail mid-batch)."""
        mm = pp.mm
        for kind, tok, grid, values in (("image", self.image_token_id, mm.image_grid_thw, mm.pixel_values),
                                        ("video", self.video_token_id, mm.video_grid_thw, mm.pixel_values_videos)):
            try:
                check_media(kind, values, grid, self.merge, self.row_width)
                check_placeholders(kind, sum(1 for t in pp.token_ids if t == tok), grid, self.merge)
            except ValueError as e:
                raise RequestRejected(str(e)) from None
