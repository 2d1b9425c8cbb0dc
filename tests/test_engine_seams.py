"""Engine seams (issue #25): the worker owns the KV cache with an explicit kv-head count, the pool only keeps rows."""
import pytest
import torch

from tiny import tiny_model

from qwen2vl.engine import LLMEngine, SamplingParams
from qwen2vl.engine.kv_pool import kv_bytes_per_token, local_kv_heads, pool_rows


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_kv_heads_come_from_the_model_not_its_config(model):
    heads = model.config.text_config.num_key_value_heads
    assert local_kv_heads(model) == heads
    model.tp_world_size = heads  # as parallel.tp.parallelize marks a model sharded over `heads` ranks
    try:
        assert local_kv_heads(model) == 1
        eng = LLMEngine(model, max_num_seqs=2, max_model_len=16, eos_token_ids=[])
        assert eng.pool.cache.keys[0].shape[1] == 1               # the worker's cache: this rank's share
        assert eng.pool.bytes == kv_bytes_per_token(model.config.text_config, 1, model.dtype) * 16 * 2
    finally:
        del model.tp_world_size
    assert not hasattr(model.config.text_config, "tp_world_size")  # nothing told through the config


def test_pool_rows():
    assert pool_rows(8, 32, 10) == 8
    assert pool_rows(8, 32, 10, "1KiB") == 1024 // 320
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        pool_rows(8, 32, 10, 319)
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        pool_rows(0, 32, 10)


def test_pool_moves_rows_in_the_workers_cache(model):
    eng = LLMEngine(model, max_num_seqs=3, max_model_len=16, eos_token_ids=[], enable_prefix_caching=False)
    assert eng.pool.worker is eng.runner.worker and eng.pool.cache is eng.runner.worker.cache
    params = SamplingParams(temperature=0, max_tokens=4)
    reqs = [eng.add_request({"prompt_token_ids": [20 + i, 21, 22]}, params) for i in range(3)]
    eng.step()
    keys = eng.pool.cache.keys[0]
    last = keys[2, :, :3].clone()
    eng.abort_request(reqs[0].request_id)             # row 0 freed: the sequence in row 2 moves into it
    assert eng.pool.num_active == 2 and reqs[2].seqs[0].row == 0
    assert torch.equal(keys[0, :, :3], last)
    assert eng.pool.cache.lengths[2] == 0            # the vacated row is reset
