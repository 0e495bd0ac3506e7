"""On an NVIDIA GPU, with the shipped model and no TensorFlow: what the GPU host's check runs first.

Skipped where there is no GPU. scripts/gpu_check.sh runs this folder with the offline kit installed.
"""

import asyncio

import pytest

from hmlstm.model.data import synthetic_corpus
from hmlstm.runtime import (
    CUDA,
    TENSORRT,
    check_against_cpu,
    make_session,
    nvidia_driver_present,
    tensorrt_libraries_present,
)
from hmlstm.serving.batching import BatchingRunner
from hmlstm.serving.model import DEFAULT_MODEL, load_model
from tests.serving.test_batching import alone, assert_same, streamed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not nvidia_driver_present(), reason="no NVIDIA GPU here (libcuda.so.1)")]


def test_cuda_provider_is_selected_and_matches_the_cpu_within_the_export_tolerance():
    rt = make_session(str(DEFAULT_MODEL), "cuda")
    assert rt.providers[0] == CUDA and rt.on_cuda
    worst = check_against_cpu(rt, str(DEFAULT_MODEL), tolerance=1e-4, steps=333, batch=17)
    print(f"CUDA against CPU, 17 x 333: max |diff| {worst:.3g}")


def test_bound_state_stays_on_the_device_and_answers_match_the_cpu():
    cuda, cpu = load_model(None, "cuda"), load_model(None, "cpu")
    texts = [synthetic_corpus(seed=80 + i, n_chars=300).text[:200] for i in range(4)]
    expected = [alone(cpu, t, 7) for t in texts]

    async def main():
        runner = BatchingRunner(cuda, max_batch=8, max_wait_us=2000, io_binding=True)
        try:
            got = await asyncio.gather(*(streamed(runner, t, 7) for t in texts))
            return got, runner.binder
        finally:
            runner.close()

    got, binder = asyncio.run(main())
    for g, e in zip(got, expected):
        assert_same(g, e)
    ref = next(iter(got[0][1].state.values()))
    assert binder.reused > 0 and ref.batch.values[ref.output].device_name().lower() == "cuda"


def test_tensorrt_runs_the_model_or_says_why_not():
    if not tensorrt_libraries_present():
        pytest.skip("the TensorRT libraries (libnvinfer) do not load on this host")
    rt = make_session(str(DEFAULT_MODEL), "tensorrt")
    assert rt.providers[0] == TENSORRT
    worst = check_against_cpu(rt, str(DEFAULT_MODEL), tolerance=1e-4)
    print(f"TensorRT against CPU: max |diff| {worst:.3g}")
