"""Benchmark stage 5's training step, configurations side by side in one run:

1. ``concat``       chosen and rejected rows in ONE forward (what stage 5 runs), plain torch;
2. ``two_fwd``      chosen and rejected as two forwards, plain torch;
3. ``concat+gc``    (1) with gradient checkpointing on the language model's layers;
4. ``zero2``        (1) under DeepSpeed ZeRO-2, single process (gloo on CPU).

Each configuration runs in its own subprocess (a fresh model, a clean peak-memory
counter) on the same synthetic pairs, and reports pairs/s of the median timed optimizer step
(after one warm-up step) and peak memory of the training steps: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the growth of the process's peak resident set
(``resource.getrusage(...).ru_maxrss``) from just before the first step (torch's CPU
allocator bypasses ``tracemalloc``). Writes a table and ``bench/results/train-<time>.json``.

    python bench/bench_train.py --quick          # tiny random Janus, 8x8 grid, < 2 min on 2 CPU cores
    python bench/bench_train.py --grid 24 --pairs 16 --micro-batch 4 --steps 4

On CPU the model is tiny: read the ratios, not the absolute rates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "concat": {"concat": True, "gc": False, "deepspeed": None},
    "two_fwd": {"concat": False, "gc": False, "deepspeed": None},
    "concat+gc": {"concat": True, "gc": True, "deepspeed": None},
    "zero2": {"concat": True, "gc": False, "deepspeed": "deepspeed/zero2.json"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (grid 8, 3 timed steps)")
    p.add_argument("--model", help="checkpoint for from_pretrained (default: a tiny random Janus)")
    p.add_argument("--grid", type=int, default=None, help="tiny model's visual grid (default 16; quick 8)")
    p.add_argument("--pairs", type=int, default=None, help="synthetic pairs (default 16; quick 8)")
    p.add_argument("--micro-batch", type=int, default=None, help="pairs per micro-batch (default 4; quick 4)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 5; quick 3)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", help="write the results here (default bench/results/train-<time>.json)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    return p.parse_args(argv)


def _pairs(n: int, grid: int, codebook: int, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.RandomState(seed)
    words = ["a red cube", "two dogs on a bench", "a blue ball left of a green box", "three apples"]
    side = lambda: {"tokens": rng.randint(0, codebook, grid * grid).tolist(),  # noqa: E731
                    "mask": rng.randint(0, 2, (grid, grid)).tolist()}
    return [{"id": f"p{i}", "k": 0, "prompt": words[i % len(words)], "chosen": side(), "rejected": side()}
            for i in range(n)]


def run_one(spec: dict) -> dict:
    """One configuration in this process (the child)."""
    import torch

    torch.set_num_threads(spec["threads"])
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    from ospo import config
    from ospo.engine import Engine
    from ospo.stages.train import Trainer, load_pairs

    c = CONFIGS[spec["name"]]
    steps = spec["steps"] + 1
    overrides = [f"train.micro_batch_size={spec['micro_batch']}", "train.grad_accum=1", f"train.max_steps={steps}",
                 f"train.gradient_checkpointing={str(c['gc']).lower()}", "train.learning_rate=1e-4"]
    if c["deepspeed"]:
        overrides.append(f"train.deepspeed={c['deepspeed']}")
    cfg = config.build({}, overrides)
    engine = Engine.load(path=spec["model"])
    recs = _pairs(spec["pairs"], engine.grid, engine.model.config.vq_config.num_embeddings)
    data = load_pairs(recs, engine)
    tr = Trainer(cfg, engine, data, concat=c["concat"])
    tr.setup(steps)
    cuda = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tr.step(1)  # warm-up (allocations, DeepSpeed buckets)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses, times = [], []
    for s in range(2, steps + 1):
        t0 = time.perf_counter()
        losses.append(tr.step(s)["loss/total"])
        sync()
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]  # median step: robust to a busy shared machine
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if cuda
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024)
    tr.close()
    return {"name": spec["name"], "pairs_per_s": spec["micro_batch"] / dt, "s_per_step": dt, "step_times": times,
            "peak_mem_mib": peak, "mem_kind": "cuda_max_allocated" if cuda else "cpu_maxrss_growth",
            "losses": losses, "device": str(engine.device)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))))
        return 0
    q = args.quick
    grid = args.grid or (8 if q else 16)
    n_pairs = args.pairs or (8 if q else 16)
    mb = args.micro_batch or 4
    steps = args.steps or (3 if q else 5)
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from ospo.tiny import build_tiny_janus

            model = str(build_tiny_janus(Path(tmp) / "tiny", grid=grid))
        results = []
        for name in args.configs.split(","):
            spec = {"name": name, "model": model, "pairs": n_pairs, "micro_batch": mb, "steps": steps,
                    "threads": args.threads}
            env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                  text=True, env=env, cwd=str(root))
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"{name}: failed (rc {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
                results.append({"name": name, "error": proc.stderr[-500:]})
                continue
            results.append(json.loads(line[len("RESULT "):]))
    ref = next((r for r in results if r["name"] == "concat" and "error" not in r), None)
    print(f"\nstage 5 training step: grid {grid} ({grid * grid} visual tokens), {mb} pairs per micro-batch, "
          f"{steps} timed steps\n")
    print(f"{'config':<12} {'pairs/s':>9} {'s/step':>8} {'peak MiB':>9} {'vs concat':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:<12} failed")
            continue
        rel = f"{r['pairs_per_s'] / ref['pairs_per_s']:.2f}x" if ref else "-"
        print(f"{r['name']:<12} {r['pairs_per_s']:>9.2f} {r['s_per_step']:>8.3f} {r['peak_mem_mib']:>9.1f} {rel:>10}")
    out = Path(args.json) if args.json else root / "bench" / "results" / f"train-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"grid": grid, "pairs": n_pairs, "micro_batch": mb, "steps": steps,
                               "threads": args.threads, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
