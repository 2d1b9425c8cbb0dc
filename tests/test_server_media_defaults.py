"""Server-wide media defaults (--min-pixels / --max-pixels / --fps / --mm-processor-kwargs): they apply to images
that set nothing, a request's own values win within --max-image-pixels, bad options are refused by name."""
from __future__ import annotations

import openai
import pytest

from qwen2vl.server import ServerThread, build_engine, create_app, settings_from
from qwen2vl.server.media_defaults import MediaDefaults, from_args
from test_engine import build_model_dir
from test_server import NAME, args_for, data_url, image_msg, png


def test_defaults_apply_and_requests_override(tmp_path):
    build_model_dir(str(tmp_path))
    args = args_for(tmp_path, None, "--mm-processor-kwargs", '{"max_pixels": 200000, "fps": 1}',
                    "--max-pixels", "3136")
    engine = build_engine(args)
    server = ServerThread(create_app(engine, settings_from(args, engine))).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        url = data_url(png((200, 200, 0), (200, 200)))

        def prompt_tokens(**pixels):
            return client.chat.completions.create(model=NAME, messages=image_msg(url, **pixels), max_tokens=1,
                                                  temperature=0).usage.prompt_tokens
        default, own = prompt_tokens(), prompt_tokens(max_pixels=112 * 112)
        assert own == default + (16 - 4)  # server default 56x56 → 2x2 merged patches, the request's 112x112 → 4x4
        with pytest.raises(openai.BadRequestError, match="exceeds the server limit"):
            prompt_tokens(max_pixels=10**6)
    finally:
        server.stop()


def test_option_checks_and_clamping():
    d = from_args(args_for("m", None, "--mm-processor-kwargs", '{"min_pixels": 3136, "fps": 2}', "--fps", "0.5"))
    assert d == MediaDefaults(min_pixels=3136, fps=0.5)
    assert d.apply({"max_pixels": 1000}, video=True) == {"min_pixels": 1000, "max_pixels": 1000, "fps": 0.5}
    assert d.apply({"num_frames": 4}, video=True) == {"num_frames": 4, "min_pixels": 3136}
    for bad, message in [(["--mm-processor-kwargs", '{"resized_height": 1}'], "unsupported keys"),
                         (["--max-pixels", "300000"], "max_pixels must be"),
                         (["--min-pixels", "5000", "--max-pixels", "4000"], "min_pixels must be <="),
                         (["--fps", "0"], "fps must be")]:
        with pytest.raises(ValueError, match=message):
            from_args(args_for("m", None, *bad))
