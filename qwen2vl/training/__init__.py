"""Supervised fine-tuning: `data` (JSONL records, labels on the assistant turns, collation), `trainer` (the
training loop), `command` (the ``qwen2vl train`` command and `train()`); this package is the public API
(``qwen2vl.train`` re-exports it)."""
from .command import add_arguments, main, run, train
from .data import (IGNORE_INDEX, SFTCollator, assistant_header_ids, build_labels, load_jsonl, media_of,
                   resolve_media_paths, split_prompt_answer)
from .trainer import Trainer, TrainingArguments, freeze, generate_answers, lr_factor

__all__ = ["IGNORE_INDEX", "SFTCollator", "Trainer", "TrainingArguments", "add_arguments", "assistant_header_ids",
           "build_labels", "freeze", "generate_answers", "load_jsonl", "lr_factor", "main", "media_of",
           "resolve_media_paths", "run", "split_prompt_answer", "train"]
