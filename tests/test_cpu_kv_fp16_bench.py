"""bench.cpu_kv_fp16 times a real attention step in both dtypes: the float16 node must compute what the float32 one
does (a float16 op that returned garbage or ignored the cache would time as fast as it likes)."""

import numpy as np

from bench.cpu_kv_fp16 import attention_session, bind_step


def _step(dtype: str, context: int) -> np.ndarray:
    session = attention_session(dtype, threads=1)
    binding = bind_step(session, dtype, context, buffer=context + 8)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0].astype(np.float32)


def test_the_float16_attention_step_agrees_with_float32_and_reads_the_cache():
    fp32, fp16 = _step("float32", 24), _step("float16", 24)
    assert fp32.shape == fp16.shape == (1, 1, 32 * 64)
    # float16 inputs round the same random values; softmax-weighted sums of unit normals stay O(1)
    assert np.abs(fp16 - fp32).max() < 0.05
    # the cached tokens matter: the same new token over a shorter cache gives another output
    assert np.abs(_step("float32", 4) - fp32).max() > 0.05
