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

# lines of a real llama-mtmd-cli --perf -lv 4 run (224x224 image, 2 threads, a busy machine)
MTMD_LOG = """0.26.078.299 I encoding mtmd batch, n_chunks = 1 (done = 1, total = 3)
0.48.052.796 I mtmd batch encoding done in 21975 ms
0.48.052.886 I decoding image batch 1/1, n_tokens_batch = 64
0.54.075.538 I image decoded (batch 1/1) in 6022 ms
0.57.923.548 I llama_perf_context_print:        load time =   13187.83 ms
0.57.923.552 I llama_perf_context_print: prompt eval time =   39054.33 ms /    78 tokens (  500.70 ms per token, \
    2.00 tokens per second)
0.57.923.554 I llama_perf_context_print:        eval time =       0.00 ms /     1 runs   (    0.00 ms per token, \
     inf tokens per second)
0.57.923.556 I llama_perf_context_print:       total time =   43208.92 ms /    79 tokens
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


def test_mtmd_log_gives_ttft_and_its_parts_in_seconds():
    got = bench_llamacpp.parse_mtmd_log(MTMD_LOG)
    assert got == pytest.approx({"ttft": 39.05433, "encode": 21.975, "image_prefill": 6.022, "tokens": 78})
    two = MTMD_LOG.replace("0.48.052.886", "mtmd batch encoding done in 1000 ms\n0.48.052.886")
    assert bench_llamacpp.parse_mtmd_log(two)["encode"] == pytest.approx(22.975)  # every encoded batch counts


def test_mtmd_log_without_timings_is_a_clear_error():
    with pytest.raises(ValueError, match="no vision-encode or prompt-eval time"):
        bench_llamacpp.parse_mtmd_log("main: loading model\nerror: something else\n")
