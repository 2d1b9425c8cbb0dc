"""The llama.cpp comparison bench's own logic (no llama.cpp needed): the AMX build fix and the log parsing that
its TTFT row rests on."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_llamacpp  # noqa: E402
import llamacpp_setup  # noqa: E402

# what GCC 12 miscompiles: stores to `tc`, then the tile config load (abridged from ggml-cpu/amx/mmq.cpp)
MMQ = """static void ggml_tile_config_init(void) {
    static thread_local bool done = false;
    if (done) return;
    alignas(64) __tile_config tc = {};
    tc.palette_id = 1;
    tc.rows[7] = 16;  tc.colsb[7] = 64;

    _tile_loadconfig(&tc);
    done = true;
}
"""

# the lines of a real llama-mtmd-cli --perf run (1024x768 image, 2 threads) that the parser reads, among others
MTMD_LOG = """encoding mtmd batch, n_chunks = 1 (done = 1, total = 3)
mtmd batch encoding done in 65726 ms
image decoded (batch 1/1) in 21088 ms
llama_perf_context_print:        load time =    1500.12 ms
llama_perf_context_print: prompt eval time =   21480.55 ms /  1024 tokens (   20.98 ms per token,    47.67 tokens per second)
llama_perf_context_print:        eval time =       0.00 ms /     1 runs   (    0.00 ms per token,      inf tokens per second)
"""


def test_amx_fix_is_inserted_once_before_the_tile_config_load(tmp_path):
    src = tmp_path / llamacpp_setup.AMX_FILE
    src.parent.mkdir(parents=True)
    src.write_text(MMQ)
    assert llamacpp_setup.apply_amx_fix(tmp_path)
    text = src.read_text()
    assert text.count(llamacpp_setup.AMX_FIX) == 1
    assert text.index(llamacpp_setup.AMX_FIX) < text.index("_tile_loadconfig(&tc);") < text.index("done = true")
    assert llamacpp_setup.apply_amx_fix(tmp_path) and src.read_text() == text  # a second run changes nothing


def test_amx_fix_leaves_an_unknown_source_alone(tmp_path):
    src = tmp_path / llamacpp_setup.AMX_FILE
    src.parent.mkdir(parents=True)
    src.write_text("int x;\n")
    assert not llamacpp_setup.apply_amx_fix(tmp_path)
    assert src.read_text() == "int x;\n"


def test_mtmd_log_gives_vision_encode_and_prompt_eval_seconds():
    enc, pe = bench_llamacpp.parse_mtmd_log(MTMD_LOG)
    assert enc == pytest.approx(65.726) and pe == pytest.approx(21.48055)
    two = MTMD_LOG.replace("image decoded", "mtmd batch encoding done in 1000 ms\nimage decoded")
    assert bench_llamacpp.parse_mtmd_log(two)[0] == pytest.approx(66.726)  # every encoded batch counts


def test_mtmd_log_without_timings_is_a_clear_error():
    with pytest.raises(ValueError, match="no vision-encode or prompt-eval time"):
        bench_llamacpp.parse_mtmd_log("main: loading model\nerror: something else\n")
