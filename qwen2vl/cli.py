"""`qwen2vl` command line: run, chat, serve, train.

    qwen2vl run --image photo.png "What is in this picture?"      # streams the answer (default: demo model)
    qwen2vl run --model path/to/Qwen2-VL-2B-Instruct --image a.jpg --json "Describe it."
    qwen2vl chat                                                    # /image PATH, /reset, /exit
    qwen2vl chat --web                                              # chat page in the browser
    qwen2vl serve --port 8000                                       # OpenAI-compatible server
    qwen2vl train --data train.jsonl --output out/                  # supervised fine-tuning

Errors print one line to stderr and exit non-zero; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

DEMO = "qwen2vl-demo"


class CliError(Exception):
    """An error whose message is the whole story for the user."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEMO, help=f"model folder or hub id (default: the bundled {DEMO})")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: cpu)")
    p.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="weight-only quantization of the decoder at load (int4: group 128, AWQ-style scaling)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder, merged into the model at load")
    p.add_argument("--max-pixels", type=int, default=None, help="pixel budget per image (e.g. 1003520)")
    p.add_argument("--min-pixels", type=int, default=None, help="minimum pixels per image")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="sample with this temperature (default: greedy)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _load(args):
    from pathlib import Path

    from .model import Qwen2VLForConditionalGeneration
    from .processing import AutoProcessor

    name = args.model
    if name != DEMO and not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        raise CliError(f"model not found: {name} (give a model folder, a hub id like Qwen/Qwen2-VL-2B-Instruct, "
                       f"or leave --model out for the bundled demo model)")
    from .model_files import resolve_name

    path = resolve_name(name)
    pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
    t = time.perf_counter()
    if args.adapter is not None and not Path(args.adapter, "adapter_config.json").is_file():
        raise CliError(f"--adapter {args.adapter}: not a PEFT adapter folder (no adapter_config.json)")
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=args.dtype, device_map=args.device,
                                                            quantization=args.quantization, adapter=args.adapter)
    processor = AutoProcessor.from_pretrained(path, **pixels)
    return model, processor, time.perf_counter() - t


def _content(images, video=None, fps=None, text=None) -> list[dict]:
    content = [{"type": "image", "image": im} for im in images]
    if video:
        content.append({"type": "video", "video": video, **({"fps": fps} if fps else {})})
    if text is not None:
        content.append({"type": "text", "text": text})
    return content


def _generate(model, processor, messages, args, on_text=None) -> dict:
    """Generate a reply to `messages`, calling `on_text(chunk)` as text arrives. Returns answer + counts."""
    from .generation import TextIteratorStreamer

    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt").to(model.device)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature else {"do_sample": False}
    result: dict = {}

    def work():
        try:
            result["ids"] = model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer,
                                           **sampling)
        except BaseException as exc:  # re-raised in the main thread
            result["error"] = exc
            streamer.end()

    t0 = time.perf_counter()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    chunks, ttft = [], None
    for chunk in streamer:
        if ttft is None and chunk:
            ttft = time.perf_counter() - t0
        chunks.append(chunk)
        if on_text:
            on_text(chunk)
    thread.join()
    if "error" in result:
        raise result["error"]
    total = time.perf_counter() - t0
    prompt_len = inputs["input_ids"].shape[1]
    new = int(result["ids"].shape[1] - prompt_len)  # batch of one: no padding, the EOS token is counted
    completion = processor.tokenizer.decode(result["ids"][0, prompt_len:], skip_special_tokens=True)
    return {"answer": completion.strip() if completion else "".join(chunks).strip(), "prompt_tokens": prompt_len,
            "completion_tokens": new, "ttft_s": ttft if ttft is not None else total, "total_s": total,
            "tokens_per_s": new / total if total > 0 else 0.0}


def cmd_run(args) -> int:
    model, processor, load_s = _load(args)
    messages = [{"role": "user", "content": _content(args.image, args.video, args.fps, args.prompt)}]
    if args.json:
        record = _generate(model, processor, messages, args)
        record = {"model": args.model, **record, "load_s": load_s}
        print(json.dumps(record, ensure_ascii=False))
    else:
        _generate(model, processor, messages, args, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")
    return 0


def _engine_reply(engine, messages, args, on_text) -> str:
    """One chat turn through the engine: its prefix cache holds the earlier turns (pictures included), so only
    the new message is prefilled."""
    from .engine import SamplingParams

    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature or 0.0)
    engine.add_request({"messages": messages}, params)
    chunks = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.error is not None:
                raise out.error
            delta = out.outputs[0].delta_text
            if delta:
                chunks.append(delta)
                on_text(delta)
    return "".join(chunks).strip()


def cmd_chat(args) -> int:
    if args.web:  # the same chat in a browser: `qwen2vl serve` with its chat page, on this model
        argv = ["--model", args.model, "--dtype", args.dtype, "--host", args.host, "--port", str(args.port)]
        if args.device:
            argv += ["--device", args.device]
        return cmd_serve(argv)
    from .engine import EngineConfig, LLMEngine

    model, processor, _ = _load(args)
    engine = LLMEngine(model, processor, EngineConfig(max_num_seqs=1))
    history: list[dict] = []
    pending: list[str] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"qwen2vl chat with {args.model}. /image PATH adds a picture to your next message; /reset; /exit")
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history, pending = [], []
            print("(history cleared)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path:
                print("usage: /image PATH_OR_URL", file=sys.stderr)
                continue
            from .processing.media import load_image

            try:
                load_image(path)  # fail now with a clear message, not at the next turn
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                continue
            pending.append(path)
            print(f"(image added: {path})")
            continue
        turn = {"role": "user", "content": _content(pending, text=line)}
        try:
            answer = _engine_reply(engine, history + [turn], args,
                                   on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history += [turn, {"role": "assistant", "content": answer}]
        pending = []
    return 0


def cmd_serve(argv: list[str]) -> int:
    from . import server

    return server.main(argv) or 0


def cmd_train(argv: list[str]) -> int:
    try:
        from . import training
    except ImportError as exc:
        raise CliError(f"training is not available in this installation ({exc})") from exc
    return training.main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2vl", description="Run, chat with, serve and fine-tune Qwen2-VL.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer one prompt (streams to stdout)")
    _add_model_args(run)
    run.add_argument("--image", action="append", default=[], help="image path, URL or data URI (repeatable)")
    run.add_argument("--video", default=None, help="video path or URL")
    run.add_argument("--fps", type=float, default=None, help="frames per second to sample from the video")
    run.add_argument("--json", action="store_true", help="print one JSON record instead of streaming text")
    run.add_argument("prompt")
    chat = sub.add_parser("chat", help="interactive multi-turn chat (--web: in the browser)")
    _add_model_args(chat)
    chat.add_argument("--web", action="store_true",
                      help="start the server with its chat page on this model and print the URL to open")
    chat.add_argument("--host", default="127.0.0.1", help="with --web: bind address (default local only)")
    chat.add_argument("--port", type=int, default=8000, help="with --web: port (default 8000)")
    sub.add_parser("serve", help="OpenAI-compatible HTTP server (see `qwen2vl serve --help`)", add_help=False)
    sub.add_parser("train", help="supervised fine-tuning (see `qwen2vl train --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv and argv[0] == "serve":
            return cmd_serve(argv[1:])
        if argv and argv[0] == "train":
            return cmd_train(argv[1:])
        args = build_parser().parse_args(argv)
        return {"run": cmd_run, "chat": cmd_chat}[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (CliError, ValueError, OSError, FileNotFoundError) as exc:
        if debug:
            raise
        print(f"qwen2vl: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # anything unexpected still gets one line unless --debug
        if debug:
            raise
        print(f"qwen2vl: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
