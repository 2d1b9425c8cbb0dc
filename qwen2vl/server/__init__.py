"""OpenAI-compatible HTTP server (`qwen2vl serve`).

CLI hook: `qwen2vl.server.main(argv)`, or `add_arguments(parser)` then `run(args)`.
Programmatic: `create_app(AsyncEngine, ServerSettings)`; `ServerThread(app)` serves it in a background thread.
"""
from .app import ServerSettings, create_app
from .startup import ServerThread, add_arguments, build_engine, main, run, settings_from
from .media_policy import MediaPolicy

__all__ = ["MediaPolicy", "ServerSettings", "ServerThread", "add_arguments", "build_engine", "create_app", "main",
           "run", "settings_from"]
