"""The ``qwen2vl train`` command (``add_arguments``, ``run``, ``main``) and ``train()``, on top of `data` / `trainer`.

Library (``qwen2vl.training``; ``qwen2vl.train`` is the same API)::

    from qwen2vl import Qwen2VLForConditionalGeneration, AutoProcessor
    from qwen2vl.training import TrainingArguments, Trainer, load_jsonl
    model = Qwen2VLForConditionalGeneration.from_pretrained("path/to/Qwen2-VL-2B-Instruct", dtype="float32")
    processor = AutoProcessor.from_pretrained("path/to/Qwen2-VL-2B-Instruct", max_pixels=256 * 28 * 28)
    args = TrainingArguments(output_dir="out", learning_rate=1e-5, num_train_epochs=1, freeze_vision_tower=True)
    Trainer(model, processor, args, load_jsonl("train.jsonl"), load_jsonl("eval.jsonl")).train()

Command::

    qwen2vl train --model path/to/Qwen2-VL-2B-Instruct --data train.jsonl --eval-data eval.jsonl \\
        --output-dir out --epochs 1 --lr 1e-5 --batch-size 4 --grad-accum 4 --freeze-vision-tower
    qwen2vl train ... --lora-r 16 --lora-alpha 32 [--lora-target q_proj v_proj] [--lora-vision]   # PEFT adapter

The JSONL holds one ``{"messages": [...]}`` conversation per line in the processor's message format; image / video
paths are relative to the JSONL file. Loss is computed on the assistant turns only (see ``training.data``).
"""
from __future__ import annotations

import argparse
import json

from ..model import Qwen2VLForConditionalGeneration
from ..model_files import resolve_name
from ..processing.processor import Qwen2VLProcessor
from .data import load_jsonl
from .trainer import Trainer, TrainingArguments


def train(model, processor, train_dataset, eval_dataset=None, args: TrainingArguments | None = None,
          **kwargs) -> dict:
    """Fine-tune ``model`` in place; ``kwargs`` are ``TrainingArguments`` fields (when ``args`` is None)."""
    args = args or TrainingArguments(**kwargs)
    return Trainer(model, processor, args, train_dataset, eval_dataset).train()


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="qwen2vl-demo", help="checkpoint folder, hub id or 'qwen2vl-demo'")
    p.add_argument("--data", required=True, help="training JSONL ({'messages': [...]} per line)")
    p.add_argument("--eval-data", default=None, help="evaluation JSONL")
    p.add_argument("--output-dir", "--output", dest="output_dir", required=True,
                   help="where checkpoints (model + processor files) are written")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training records")
    p.add_argument("--eval-limit", type=int, default=None, help="use only the first N evaluation records")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--eval-batch-size", type=int, default=8)
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--scheduler", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--min-lr-ratio", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--freeze-vision-tower", action="store_true", help="do not train the ViT")
    g.add_argument("--freeze-merger", action="store_true", help="do not train the vision-language merger")
    g.add_argument("--freeze-language-model", action="store_true", help="do not train the decoder / LM head")
    g.add_argument("--max-length", type=int, default=None, help="skip conversations longer than this (tokens)")
    lo = p.add_argument_group("LoRA (needs peft: pip install 'qwen2vl[lora]')")
    lo.add_argument("--lora-r", type=int, default=0, help="LoRA rank; > 0 trains adapters only and saves a PEFT "
                    "adapter folder")
    lo.add_argument("--lora-alpha", type=float, default=32.0)
    lo.add_argument("--lora-dropout", type=float, default=0.0)
    lo.add_argument("--lora-target", nargs="+", default=None, metavar="NAME",
                    help="text projections to adapt (default: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)")
    lo.add_argument("--lora-vision", action="store_true", help="also adapt the vision tower's linears and merger")
    g.add_argument("--dtype", default="float32", help="weights dtype: float32 (default) | bfloat16")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast (mixed precision)")
    g.add_argument("--device", default="auto")
    g.add_argument("--min-pixels", type=int, default=None)
    g.add_argument("--max-pixels", type=int, default=None)
    g.add_argument("--fps", type=float, default=None, help="video frame sampling rate")
    e = p.add_argument_group("evaluation / checkpoints")
    e.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    e.add_argument("--eval-generate", action="store_true", help="also measure exact-match accuracy by generating")
    e.add_argument("--save-steps", type=int, default=0, help="save a checkpoint-N folder every N steps")
    e.add_argument("--logging-steps", type=int, default=10)
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    if args.lora_r <= 0 and (args.lora_target or args.lora_vision):
        raise ValueError("--lora-target / --lora-vision need --lora-r > 0")
    train_set = load_jsonl(args.data, args.limit)
    eval_set = load_jsonl(args.eval_data, args.eval_limit) if args.eval_data else None
    path = resolve_name(args.model)
    pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
    processor = Qwen2VLProcessor.from_pretrained(path, **pixels)
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=args.dtype)
    targs = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type=args.scheduler,
        warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio, min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, freeze_vision_tower=args.freeze_vision_tower,
        freeze_merger=args.freeze_merger, freeze_language_model=args.freeze_language_model,
        max_length=args.max_length, bf16=args.bf16, device=args.device, eval_steps=args.eval_steps,
        eval_generate=args.eval_generate, save_steps=args.save_steps, logging_steps=args.logging_steps,
        progress=not args.no_progress, processor_kwargs={"fps": args.fps} if args.fps else {},
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_target=args.lora_target, lora_vision=args.lora_vision)
    result = Trainer(model, processor, targs, train_set, eval_set).train()
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2vl train", description="Supervised fine-tuning of Qwen2-VL.")
    parser = add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return run(parser.parse_args(argv))
