"""bench/bandwidth.py: the byte and fraction arithmetic of issue 7 item 6 (runs on CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bandwidth  # noqa: E402


def test_decode_bytes_hand_example():
    """Hand-computed: 100 params per step in bf16 (2 bytes), 2 layers, 1 KV head of dim 4,
    2 rows (one prompt + its CFG uncond row), prompt of 3 positions, 2 decode steps.

    weights: 2 steps * 100 params * 2 bytes                        = 400
    KV per cached position: 2 (K,V) * 2 layers * 1 head * 4 dims * 2 rows * 2 bytes = 64
    step 0 reads 3 positions, step 1 reads 4 -> 7 positions * 64    = 448
    total                                                          = 848
    """
    assert bandwidth.kv_bytes_per_position(2, 1, 4, 2, 2) == 64
    assert bandwidth.decode_bytes(100, 2, 2, 1, 4, 2, 3, 2) == 848
    # one step: weights + the prompt's KV only
    assert bandwidth.decode_bytes(100, 2, 2, 1, 4, 2, 3, 1) == 200 + 3 * 64
    # matches the explicit per-step sum at a larger size
    args = dict(n_params_per_step=1234, dtype_bytes=2, n_layers=3, n_kv_heads=2, head_dim=8, batch_rows=4,
                prompt_len=11, n_tokens=17)
    per_pos = 2 * 3 * 2 * 8 * 4 * 2
    assert bandwidth.decode_bytes(**args) == sum(1234 * 2 + per_pos * (11 + t) for t in range(17))
    assert bandwidth.decode_bytes(100, 2, 2, 1, 4, 2, 3, 0) == 0
    with pytest.raises(ValueError):
        bandwidth.decode_bytes(-1, 2, 2, 1, 4, 2, 3, 2)


def test_fraction():
    # 848 bytes in 1 us = 848 MB/s, over a 1 GB/s device
    assert bandwidth.fraction(848, 1e-6, 1e9) == pytest.approx(0.848)
    assert bandwidth.fraction(2e12, 1.0, 4e12) == pytest.approx(0.5)
    for bad in [(1, 0, 1), (1, 1, 0), (1, -1, 1)]:
        with pytest.raises(ValueError):
            bandwidth.fraction(*bad)


def test_measure_bandwidth_cpu_smoke():
    bw = bandwidth.measure_bandwidth("cpu", nbytes=1 << 20, repeats=2)
    assert bw > 0


def test_run_needs_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError):
        bandwidth.run(None, 1)
