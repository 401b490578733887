"""Stage 3 decode: achieved fraction of the memory-bandwidth bound (issue 7 item 6, CUDA only).

Image sampling (:func:`ospo.sampling.sample_images`) decodes one visual token per step for
2 * batch rows (cond + uncond, CFG). Each step has to read, at least once:

* the weights it uses: the language model's decoder layers and final norm, the generation
  head, the generation aligner, plus the generation-embedding rows of the tokens fed (the
  LM's text ``embed_tokens`` is not used: sampling passes ``inputs_embeds``);
* the KV cache written so far: ``2 (K and V) * layers * kv_heads * head_dim * rows *
  (prompt_len + t) * dtype_bytes`` at step t.

Summed over the ``num_image_tokens`` steps of one call this is the minimum traffic; divided by
the measured time it is the achieved bandwidth, and divided by the device's bandwidth the
fraction of the bound (1.0 = decode runs at memory speed). The device bandwidth is measured,
not looked up: a large device-to-device copy, read + write bytes over time, best of a few.

Caveats, reported with the numbers: the timed call includes the prefill (step 0 here counts
as reading the weights and the prompt's KV once) and the final host copy of the tokens, so the
fraction is a slight underestimate. The sampler's KV cache is preallocated but attention
reads only the ``prompt_len + t`` columns written so far (:class:`ospo.sampling._KVStore`),
so the minimum above is also the traffic the kernels see. On a tiny
random model the steps are launch-bound, not bandwidth-bound: only a real checkpoint's number
means anything.

The byte arithmetic (:func:`decode_bytes`, :func:`fraction`) is pure Python and runs anywhere;
:func:`run` needs CUDA.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

PROMPTS = ["a red dog to the left of a wooden bench", "a cat", "three green apples on a white plate next to a cup",
           "a blue car in front of a house", "a girl feeding a horse on a farm", "a lamp above a desk",
           "two red apples to the left of a blue cup on a white table", "a round clock above a square table"]


def kv_bytes_per_position(n_layers: int, n_kv_heads: int, head_dim: int, batch_rows: int, dtype_bytes: int) -> int:
    """Bytes of K and V for one cached position over all layers and rows."""
    return 2 * n_layers * n_kv_heads * head_dim * batch_rows * dtype_bytes


def decode_bytes(n_params_per_step: int, dtype_bytes: int, n_layers: int, n_kv_heads: int, head_dim: int,
                 batch_rows: int, prompt_len: int, n_tokens: int) -> int:
    """Minimum bytes read over ``n_tokens`` decode steps.

    Per step t (0-based): the weights (``n_params_per_step * dtype_bytes``) plus the KV cache
    of ``prompt_len + t`` positions (:func:`kv_bytes_per_position` each). Total::

        n_tokens * n_params_per_step * dtype_bytes
        + kv_bytes_per_position * (n_tokens * prompt_len + n_tokens * (n_tokens - 1) / 2)
    """
    if min(n_params_per_step, dtype_bytes, n_layers, n_kv_heads, head_dim, batch_rows, prompt_len, n_tokens) < 0:
        raise ValueError("decode_bytes: negative argument")
    weights = n_tokens * n_params_per_step * dtype_bytes
    positions = n_tokens * prompt_len + n_tokens * (n_tokens - 1) // 2
    return weights + kv_bytes_per_position(n_layers, n_kv_heads, head_dim, batch_rows, dtype_bytes) * positions


def fraction(nbytes: float, seconds: float, bandwidth_bytes_per_s: float) -> float:
    """Achieved bandwidth (``nbytes / seconds``) as a fraction of ``bandwidth_bytes_per_s``."""
    if seconds <= 0 or bandwidth_bytes_per_s <= 0:
        raise ValueError("fraction: seconds and bandwidth must be > 0")
    return nbytes / seconds / bandwidth_bytes_per_s


def measure_bandwidth(device, *, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Achievable bandwidth in bytes/s: a ``nbytes`` device-to-device copy, (read + write) bytes
    over the best time of ``repeats``. CUDA-timed with synchronize; on CPU wall time (tests)."""
    import torch

    device = torch.device(device)
    n = max(1, nbytes // 4)
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    cuda = device.type == "cuda"
    dst.copy_(src)  # warm-up
    best = float("inf")
    for _ in range(max(1, repeats)):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    moved = 2 * n * src.element_size()
    del src, dst
    return moved / max(best, 1e-9)


def step_params(engine, distinct_tokens: int) -> int:
    """Parameters read per decode step (see the module docstring)."""
    m = engine.model.model
    lm = m.language_model
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    n = count(lm.layers) + count(lm.norm) + count(m.generation_head) + count(m.generation_aligner)
    return n + distinct_tokens * m.generation_embeddings.embedding_dim


def _engine(engine_or_tiny, tmp: str):
    from ospo.engine import Engine

    if engine_or_tiny is None or isinstance(engine_or_tiny, int):  # a tiny random model at this grid
        from ospo.tiny import build_tiny_janus

        grid = engine_or_tiny or 24
        return Engine.load(path=str(build_tiny_janus(Path(tmp) / f"g{grid}", grid=grid))), f"tiny random, grid {grid}"
    if isinstance(engine_or_tiny, (str, Path)):
        return Engine.load(path=str(engine_or_tiny)), str(engine_or_tiny)
    return engine_or_tiny, getattr(engine_or_tiny, "path", "engine")


def run(engine_or_tiny=None, batch: int = 1, *, guidance_scale: float = 5.0, repeats: int = 3,
        device_bandwidth: float | None = None) -> dict:
    """Time one :func:`ospo.sampling.sample_images` call of ``batch`` prompts (no capture) with
    CUDA events and return bytes, time, achieved bandwidth and the fraction of the bound.

    ``engine_or_tiny``: a loaded Engine, a checkpoint path, or None / an int grid for a tiny
    random Janus (default grid 24). CUDA only.
    """
    import torch

    from ospo import sampling

    if not torch.cuda.is_available():
        raise RuntimeError("bandwidth.run needs CUDA")
    with tempfile.TemporaryDirectory(prefix="bench-bw-") as tmp:
        eng, label = _engine(engine_or_tiny, tmp)
        if eng.device.type != "cuda":
            raise RuntimeError(f"engine is on {eng.device}, not CUDA")
        texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        ids = eng.image_prompt_ids(texts)
        seeds = list(range(batch))
        call = lambda: sampling.sample_images(eng, ids, seeds, guidance_scale=guidance_scale,  # noqa: E731
                                              batch_size=batch)
        call()  # warm-up (allocator, kernels)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(max(1, repeats)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        cfg = eng.model.model.language_model.config
        n_layers = cfg.num_hidden_layers
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype_bytes = next(eng.model.model.language_model.parameters()).element_size()
        T = eng.num_image_tokens
        P = max(len(r) for r in ids)
        rows = 2 * batch
        n_par = step_params(eng, batch)
        total = decode_bytes(n_par, dtype_bytes, n_layers, kv_heads, head_dim, rows, P, T)
        bw = device_bandwidth or measure_bandwidth(eng.device)
        out = {
            "model": label, "device": torch.cuda.get_device_name(eng.device), "dtype": str(eng.dtype),
            "batch": batch, "rows": rows, "prompt_len": P, "decode_steps": T, "params_per_step": n_par,
            "dtype_bytes": dtype_bytes, "layers": n_layers, "kv_heads": kv_heads, "head_dim": head_dim,
            "bytes": total, "seconds": best, "ms_per_step": 1e3 * best / T,
            "achieved_gb_s": total / best / 1e9, "device_bandwidth_gb_s": bw / 1e9,
            "fraction": fraction(total, best, bw),
            "note": "timed call includes the prefill and the token copy to host (slight underestimate); "
                    "device bandwidth measured by a device-to-device copy; a tiny random model is "
                    "launch-bound, only a real checkpoint's fraction is meaningful",
        }
        del eng
        torch.cuda.empty_cache()
        return out
