"""`qwen2vl serve`: arguments, engine construction, uvicorn launch, and an in-process server thread for tests.

Entry points for the CLI: `main(argv)`, or `add_arguments(parser)` + `run(args)`.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from ..engine import AsyncEngine, EngineConfig, LLMEngine
from ..engine.lora_adapters import parse_lora_modules
from ..engine.model_setup import load_model, load_processor, start_tp
from ..engine.prefill_budget import parse_ms
from .app import ServerSettings, create_app
from .fetch import FetchPolicy
from .guards import default_allowed_hosts
from . import media_defaults
from .media_policy import MediaPolicy

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
    p.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="weight-only quantization of the decoder at load (int4: group 128, AWQ-style scaling)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over N ranks started by this command (N-1 worker processes; gloo on "
                        "the CPU, NCCL with one GPU per rank: cuda:0..N-1); this process serves as rank 0")
    p.add_argument("--tp-num-threads", type=int, default=None,
                   help="torch threads per tensor-parallel rank (default on the CPU: cores / N)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=DIR",
                   help="serve PEFT LoRA adapter folders beside the base model, each selected by a request's "
                        "`model` field (vLLM's form: name=DIR, or JSON '{\"name\": ..., \"path\": ...}'); "
                        "read at start-up only")
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (KV rows)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="max prompt + output tokens per sequence (default: min(max_position_embeddings, 8192))")
    g.add_argument("--kv-cache-memory", default=None,
                   help="KV cache budget, e.g. 2GiB or bytes; caps --max-num-seqs to what fits")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="prefill tokens per engine step")
    g.add_argument("--max-queue", type=int, default=256,
                   help="requests queued (fetching media, preprocessing or waiting in the engine) before 429")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of earlier prompts and answers, keyed by tokens and picture content "
                        "(default on; a chat's later turns prefill only their new text)")
    g.add_argument("--prefix-cache-memory", default=None,
                   help="prefix cache budget, e.g. 1GiB (default: min(1 GiB, the KV cache's size))")
    g.add_argument("--vision-cache-mb", type=float, default=256,
                   help="vision-tower outputs cached by picture content, MiB (0 turns it off)")
    g.add_argument("--max-prefill-tokens-per-step", type=int, default=None,
                   help="chunked prefill: a long prompt runs in chunks of this many tokens between the decode "
                        "steps of running requests (default: whole prompts)")
    g.add_argument("--max-prefill-ms-per-step", type=_prefill_ms, default=None, metavar="MS|auto",
                   help="chunked prefill by time: each engine step spends about this many milliseconds on a long "
                        "prompt's vision encoding and text prefill (sized from measured costs), then decodes the "
                        "running requests; 'auto' = the measured time of a decode step, which keeps their "
                        "inter-token latency near 2x. With --max-prefill-tokens-per-step too, that caps the text "
                        "chunks (default: whole prompts)")
    m = p.add_argument_group("media / limits")
    m.add_argument("--allowed-local-media-path", default=None,
                   help="directory from which file:// media URLs may be read (default: none are)")
    m.add_argument("--allow-remote-media", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch http(s):// image/video URLs (default on; --no-allow-remote-media turns it off)")
    m.add_argument("--allow-private-media-urls", action="store_true",
                   help="let media URLs reach loopback / private / link-local / reserved addresses (default: "
                        "refused, so that callers cannot reach internal services through the server)")
    m.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="DOMAIN",
                   help="fetch media only from these domains (and their subdomains)")
    m.add_argument("--max-concurrent-fetches", type=int, default=8, help="remote media downloads in flight")
    m.add_argument("--max-video-frames", type=int, default=768,
                   help="frames sampled per video (fps sampling is clamped to it; num_frames above it is refused)")
    m.add_argument("--max-prompt-chars", type=int, default=None,
                   help="text characters per request, checked before tokenization (default: 16 x max-model-len)")
    m.add_argument("--max-images-per-request", type=int, default=8)
    m.add_argument("--max-videos-per-request", type=int, default=1)
    m.add_argument("--max-image-pixels", type=int, default=32_000_000,
                   help="width*height cap, checked from the header before decoding (decompression bombs); "
                        "per-item min_pixels / max_pixels may not exceed it either")
    m.add_argument("--max-image-bytes", type=int, default=20 * 1024**2)
    m.add_argument("--max-video-bytes", type=int, default=200 * 1024**2)
    m.add_argument("--max-request-bytes", type=int, default=32 * 1024**2, help="request body size cap")
    m.add_argument("--media-timeout", type=float, default=20.0,
                   help="seconds for all of a request's remote media downloads together")
    h = p.add_argument_group("admission / HTTP safety")
    h.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                   help="Host header values accepted ('*': any; default: the --host name, plus localhost forms "
                        "when bound to loopback; any when bound to 0.0.0.0 / ::)")
    h.add_argument("--allowed-origins", nargs="+", default=(), metavar="ORIGIN",
                   help="CORS origins allowed to call the API from a browser (default: none, CORS off)")
    h.add_argument("--max-connections", type=int, default=64,
                   help="requests in flight (streams included) before 503; sockets are capped a little above")
    h.add_argument("--body-timeout", type=float, default=30.0, help="seconds to receive a request body (408)")
    h.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM, seconds in-flight requests get to finish before they are ended with 503")
    p.add_argument("--web-ui", action=argparse.BooleanOptionalAction, default=True,
                   help="serve the chat page at / (default on; --no-web-ui turns it off)")
    m.add_argument("--min-pixels", type=int, default=None,
                   help="default min_pixels of images and videos (a request's own value wins)")
    m.add_argument("--max-pixels", type=int, default=None,
                   help="default max_pixels of images and videos (a request's own value wins, up to "
                        "--max-image-pixels)")
    m.add_argument("--fps", type=float, default=None, help="default video sampling rate (frames per second)")
    m.add_argument("--mm-processor-kwargs", default=None,
                   help='vLLM-style JSON defaults, e.g. \'{"max_pixels": 401408, "fps": 1}\' (flags above win)')
    p.add_argument("--log-level", default="info")
    return p


def _prefill_ms(value: str):
    try:
        return parse_ms(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def build_engine(args, model=None, processor=None, tp_runner=None) -> AsyncEngine:
    """Load the model + processor named by `args.model` (unless given) and wrap them in an `AsyncEngine`.
    With `tp_runner` (rank 0 of a `qwen2vl.parallel` group) the engine runs on its model, every model call
    mirrored on all ranks."""
    if tp_runner is not None:
        model = tp_runner.model
    model = model if model is not None else load_model(args.model, dtype=args.dtype, device=args.device,
                                                        attn_implementation=args.attn_implementation,
                                                        quantization=args.quantization)
    processor = processor if processor is not None else load_processor(args.model)
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                       kv_cache_memory=args.kv_cache_memory, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_queue=args.max_queue, enable_prefix_caching=args.enable_prefix_caching,
                       prefix_cache_memory=args.prefix_cache_memory,
                       vision_cache_memory=int(args.vision_cache_mb * 1024**2),
                       max_prefill_tokens_per_step=args.max_prefill_tokens_per_step,
                       max_prefill_ms_per_step=getattr(args, "max_prefill_ms_per_step", None))
    engine = LLMEngine(model, processor, cfg, tp_runner=tp_runner)
    for name, path in parse_lora_modules(getattr(args, "lora_modules", None)):
        try:
            engine.add_lora(name, path)
        except (ValueError, OSError) as e:
            raise ValueError(f"--lora-modules {name}={path}: {e}") from None
    return AsyncEngine(engine)


def settings_from(args, engine: AsyncEngine | None = None) -> ServerSettings:
    fetch = FetchPolicy(allow_private=args.allow_private_media_urls,
                        allowed_domains=tuple(d.lower().strip(".") for d in args.allowed_media_domains or ()),
                        max_concurrent=args.max_concurrent_fetches, deadline=args.media_timeout)
    policy = MediaPolicy(allow_remote=args.allow_remote_media, allowed_local_media_path=args.allowed_local_media_path,
                         max_images=args.max_images_per_request, max_videos=args.max_videos_per_request,
                         max_image_pixels=args.max_image_pixels, max_image_bytes=args.max_image_bytes,
                         max_video_bytes=args.max_video_bytes, max_video_frames=args.max_video_frames,
                         max_prompt_chars=args.max_prompt_chars, fetch=fetch, defaults=media_defaults.from_args(args))
    name = args.served_model_name or str(args.model)
    hosts = tuple(args.allowed_hosts) if args.allowed_hosts else default_allowed_hosts(args.host)
    return ServerSettings(served_model_name=name, model_aliases=(str(args.model),), api_key=args.api_key,
                          lora_names=tuple(engine.engine.lora_names) if engine is not None else (),
                          media=policy, max_request_bytes=args.max_request_bytes,
                          default_sampling=default_sampling(engine.engine.model) if engine is not None else {},
                          allowed_hosts=hosts, allowed_origins=tuple(args.allowed_origins),
                          max_connections=args.max_connections, body_timeout=args.body_timeout,
                          shutdown_timeout=args.shutdown_timeout, max_queue=args.max_queue,
                          web_ui=getattr(args, "web_ui", True))


def make_uvicorn_server(app, host: str, port: int, log_level: str = "info"):
    """uvicorn, with the app's own shutdown step first: in-flight requests get `shutdown_timeout` s, then are
    ended with a JSON 503 / an SSE error event (never cut by uvicorn's task cancellation, so no tracebacks)."""
    import uvicorn

    settings = getattr(app.state, "settings", None) or ServerSettings()
    lifecycle = getattr(app.state, "lifecycle", None)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            import asyncio

            stop = asyncio.ensure_future(lifecycle.stop(settings.shutdown_timeout)) if lifecycle else None
            try:
                await super().shutdown(sockets)
            finally:
                if stop is not None:
                    stop.cancel()

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=settings.shutdown_timeout + 5,
                            limit_concurrency=settings.max_connections + 32, access_log=log_level == "debug")
    return Server(config)


def run(args) -> int:
    """Blocking: serve until SIGINT / SIGTERM, then shut the engine down cleanly."""
    if args.allowed_local_media_path and not os.path.isdir(args.allowed_local_media_path):
        raise SystemExit(f"--allowed-local-media-path {args.allowed_local_media_path!r} is not a directory")
    try:
        media_defaults.from_args(args)  # bad --min-pixels / --max-pixels / --fps / --mm-processor-kwargs
        parse_lora_modules(getattr(args, "lora_modules", None))  # bad --lora-modules syntax, before loading
    except ValueError as e:
        raise SystemExit(str(e)) from None
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    tp = getattr(args, "tensor_parallel_size", 1)
    if tp < 1:
        raise SystemExit(f"--tensor-parallel-size must be >= 1, got {tp}")
    if tp == 1:
        try:
            engine = build_engine(args)
        except ValueError as e:  # an adapter folder that cannot be served
            raise SystemExit(str(e)) from None
        return _serve(args, engine)
    if args.quantization is not None:
        raise SystemExit("--quantization is not supported with --tensor-parallel-size > 1")
    logger.info("starting %d tensor-parallel ranks for %s", tp, args.model)
    try:
        group = start_tp(args.model, tp, dtype=args.dtype, device=args.device,
                         attn_implementation=args.attn_implementation, num_threads=args.tp_num_threads)
    except ValueError as e:   # sizes that do not split over N ranks, a bad device
        raise SystemExit(f"--tensor-parallel-size {tp}: {e}") from None
    try:   # this process is rank 0: the HTTP server + engine; model calls are mirrored on every rank
        try:
            engine = build_engine(args, tp_runner=group.runner)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        return _serve(args, engine, group)
    finally:
        group.shutdown()
        logger.info("tensor-parallel workers stopped")


class _Stopped(Exception):
    pass


def _raise_stopped(signum, frame):
    raise _Stopped(signum)


def _watch_workers(group, server, stop: threading.Event, failed: list) -> None:
    """A tensor-parallel worker that dies leaves rank 0 unable to run the model: stop serving (exit code 1)."""
    while not stop.wait(0.5):
        dead = [(r + 1, p.exitcode) for r, p in enumerate(group.procs) if p.exitcode is not None]
        if dead:
            logger.error("tensor-parallel worker rank(s) exited (rank, exit code): %s; stopping the server", dead)
            failed.append(dead)
            server.should_exit = True
            return


def _serve(args, engine: AsyncEngine, group=None) -> int:
    """Run uvicorn until SIGINT / SIGTERM. uvicorn shuts down gracefully, then re-raises the signal it caught:
    turn that into a normal return (exit code 0) so the engine and any tensor-parallel workers are stopped by
    the callers' `finally` blocks instead of the process dying on the spot (SIGTERM's default action)."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_stopped) if main else None
    stop, failed = threading.Event(), []
    try:
        app = create_app(engine, settings_from(args, engine))
        server = make_uvicorn_server(app, args.host, args.port, args.log_level)
        if group is not None:
            threading.Thread(target=_watch_workers, args=(group, server, stop, failed), daemon=True,
                             name="qwen2vl-tp-watch").start()
        logger.info("serving %s on http://%s:%d/v1", args.model, args.host, args.port)
        if getattr(args, "web_ui", True):
            print(f"Chat page: http://{_url_host(args.host)}:{args.port}/", flush=True)
        server.run()
    except (KeyboardInterrupt, _Stopped):
        logger.info("server stopped by a signal")
    finally:
        stop.set()
        if main:
            signal.signal(signal.SIGTERM, old)
        engine.shutdown()
    return 1 if failed else 0


def _url_host(host: str) -> str:
    """The host part of a URL a browser on this machine can open for a bind address."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


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
