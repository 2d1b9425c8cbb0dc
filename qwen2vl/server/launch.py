"""`qwen2vl serve`: arguments, engine construction, uvicorn launch, and an in-process server thread for tests.

Entry points for the CLI: `main(argv)`, or `add_arguments(parser)` + `run(args)`.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading

from ..engine import AsyncEngine, EngineConfig, LLMEngine
from .app import ServerSettings, create_app
from .media import MediaPolicy

logger = logging.getLogger("qwen2vl.server")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--model", default="qwen2vl-demo", help="model directory, hub id, or 'qwen2vl-demo' (default)")
    p.add_argument("--served-model-name", default=None, help="name clients pass as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("QWEN2VL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $QWEN2VL_API_KEY or none)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cpu, or from the loader)")
    p.add_argument("--attn-implementation", default=None, help="sdpa | eager | flash_attention_2")
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (KV rows)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="max prompt + output tokens per sequence (default: min(max_position_embeddings, 8192))")
    g.add_argument("--kv-cache-memory", default=None,
                   help="KV cache budget, e.g. 2GiB or bytes; caps --max-num-seqs to what fits")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="prefill tokens per engine step")
    g.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    m = p.add_argument_group("media / limits")
    m.add_argument("--allowed-local-media-path", default=None,
                   help="directory from which file:// media URLs may be read (default: none are)")
    m.add_argument("--allow-remote-media", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch http(s):// image/video URLs (default on; --no-allow-remote-media turns it off)")
    m.add_argument("--max-images-per-request", type=int, default=8)
    m.add_argument("--max-videos-per-request", type=int, default=1)
    m.add_argument("--max-image-pixels", type=int, default=32_000_000,
                   help="width*height cap, checked from the header before decoding (decompression bombs)")
    m.add_argument("--max-image-bytes", type=int, default=20 * 1024**2)
    m.add_argument("--max-video-bytes", type=int, default=200 * 1024**2)
    m.add_argument("--max-request-bytes", type=int, default=32 * 1024**2, help="request body size cap")
    m.add_argument("--media-timeout", type=float, default=10.0, help="seconds per remote fetch phase")
    p.add_argument("--log-level", default="info")
    return p


def default_sampling(model) -> dict:
    """Request defaults from the checkpoint's generation config (as vLLM's `--generation-config auto`):
    temperature / top_p / top_k / min_p / repetition_penalty a request leaves unset; do_sample=False → greedy."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return {}
    cfg = {k: getattr(gen, k, None) for k in ("temperature", "top_p", "top_k", "repetition_penalty", "min_p",
                                              "do_sample")}
    out = {k: v for k, v in cfg.items() if v is not None and k != "do_sample"}
    if cfg["do_sample"] is False:
        out = {k: v for k, v in out.items() if k == "repetition_penalty"}
        out["temperature"] = 0.0
    return out


def build_engine(args, model=None, processor=None) -> AsyncEngine:
    """Load the model + processor named by `args.model` (unless given) and wrap them in an `AsyncEngine`."""
    from ..engine.llm import load_processor
    from ..engine.llm_engine import load_model

    model = model if model is not None else load_model(args.model, dtype=args.dtype, device=args.device,
                                                        attn_implementation=args.attn_implementation)
    processor = processor if processor is not None else load_processor(args.model)
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                       kv_cache_memory=args.kv_cache_memory, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_queue=args.max_queue)
    return AsyncEngine(LLMEngine(model, processor, cfg))


def settings_from(args, engine: AsyncEngine | None = None) -> ServerSettings:
    policy = MediaPolicy(allow_remote=args.allow_remote_media, allowed_local_media_path=args.allowed_local_media_path,
                         max_images=args.max_images_per_request, max_videos=args.max_videos_per_request,
                         max_image_pixels=args.max_image_pixels, max_image_bytes=args.max_image_bytes,
                         max_video_bytes=args.max_video_bytes, timeout=args.media_timeout)
    name = args.served_model_name or str(args.model)
    return ServerSettings(served_model_name=name, model_aliases=(str(args.model),), api_key=args.api_key,
                          media=policy, max_request_bytes=args.max_request_bytes,
                          default_sampling=default_sampling(engine.engine.model) if engine is not None else {})


def make_uvicorn_server(app, host: str, port: int, log_level: str = "info"):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10,
                            lifespan="on", access_log=log_level == "debug")
    return uvicorn.Server(config)


def run(args) -> int:
    """Blocking: serve until SIGINT / SIGTERM, then shut the engine down cleanly."""
    if args.allowed_local_media_path and not os.path.isdir(args.allowed_local_media_path):
        raise SystemExit(f"--allowed-local-media-path {args.allowed_local_media_path!r} is not a directory")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    engine = build_engine(args)
    try:
        app = create_app(engine, settings_from(args, engine))
        server = make_uvicorn_server(app, args.host, args.port, args.log_level)
        logger.info("serving %s on http://%s:%d/v1", args.model, args.host, args.port)
        server.run()
    finally:
        engine.shutdown()
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="qwen2vl serve",
                                                   description="OpenAI-compatible chat completions server"))
    return run(parser.parse_args(argv))


class ServerThread:
    """Run an app under uvicorn in a background thread (tests, notebooks): `with ServerThread(app) as s: s.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.host, self.port = host, port
        self.server = make_uvicorn_server(app, host, port, log_level)
        self.thread = threading.Thread(target=self.server.run, name="qwen2vl-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
