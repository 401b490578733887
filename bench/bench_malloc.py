"""ShapesWorld recipe steps under glibc's default malloc vs raised mmap/trim thresholds (and other allocators).

    python bench/bench_malloc.py [--checkpoint shapes:] [--steps 20] [--rounds 3]
        [--preload /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ...] [--json OUT]

Each variant is a fresh process (the allocator is chosen when a process starts), and the
variants run in alternation, ``--rounds`` times, so that a machine that is slower for a while
slows them all; the medians are compared. Every process loads the checkpoint, fills a small
data pool (timed), and runs ``--steps`` steps of each phase through the recipe's own training
functions (:func:`ospo.shapes.pretrain.train_lm`, :func:`~ospo.shapes.pretrain.train_yes_no`),
with its batch sizes, optimizer and losses. The weights change the cost of nothing, so any
checkpoint of that architecture will do. Also reported: each process's peak RSS and its
final losses, which must agree across variants (the allocator must not change the math).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="shapes:")
    p.add_argument("--steps", type=int, default=20, help="steps of each phase per process")
    p.add_argument("--pool", type=int, default=256, help="images in each data pool (generation, understanding)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preload", nargs="*", default=[], help="allocator libraries to add as LD_PRELOAD variants")
    p.add_argument("--json", help="write the result dict here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(a) -> dict:
    import resource

    import torch

    from ospo.engine import Engine
    from ospo.shapes import pretrain as pt

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    eng = Engine.load(path=a.checkpoint)
    vq = eng.model.model.vqmodel
    r = dataclasses.replace(pt.Recipe(), gen_pool=a.pool, und_pool=a.pool, steps=a.steps, warmup=1, eval_every=0,
                            eval_yes_no=0, yn_stage_steps=0, yn_full_steps=a.steps, yn_decay_steps=0)
    t0 = time.perf_counter()
    b = pt.Batcher(eng, vq, r, seed_tag="bench", progress=False)
    pool = time.perf_counter() - t0
    p1 = pt.train_lm(eng, vq, r, progress=False, batcher=b)
    p2 = pt.train_yes_no(eng, vq, r, b, progress=False)
    last1, last2 = p1["history"][-1], p2["history"][-1]
    return {"pool_s_per_image": pool / (2 * a.pool), "phase1_s_per_step": p1["seconds"] / a.steps,
            "phase2_s_per_step": p2["seconds"] / a.steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "final_losses": {"phase1": {k: last1[k] for k in ("gen", "text") if k in last1},
                             "phase2": {k: last2[k] for k in ("yes_no", "gen", "text") if k in last2}}}


# glibc serves each allocation above its mmap threshold (128 KiB, raised on the fly up to
# 32 MiB) with its own mmap, zero-filled by the kernel page by page, and trims the heap top
# above its trim threshold: 1 GiB for both keeps every activation tensor in the heap.
TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"


def variants(a) -> dict[str, dict]:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = {"glibc_default": dict(base), "glibc_tuned": dict(base, GLIBC_TUNABLES=TUNABLES)}
    for lib in a.preload:
        if Path(lib).exists():
            out[Path(lib).name.split(".so")[0]] = dict(base, LD_PRELOAD=lib)
    return out


def run(a) -> dict:
    envs = variants(a)
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", "--checkpoint", a.checkpoint,
            "--steps", str(a.steps), "--pool", str(a.pool), "--threads", str(a.threads)]
    got: dict[str, list[dict]] = {k: [] for k in envs}
    for rnd in range(a.rounds):
        for name, env in envs.items():
            out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{name} worker failed:\n{out.stderr[-2000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            got[name].append(res)
            print(f"round {rnd + 1} {name}: {json.dumps(res)}", file=sys.stderr, flush=True)
    keys = ("pool_s_per_image", "phase1_s_per_step", "phase2_s_per_step")
    med = {n: {k: round(statistics.median(x[k] for x in v), 4) for k in keys} for n, v in got.items()}
    ref = med["glibc_default"]
    losses = {n: v[0]["final_losses"] for n, v in got.items()}
    return {"checkpoint": a.checkpoint, "steps": a.steps, "pool": a.pool, "rounds": a.rounds, "threads": a.threads,
            "median": med,
            "speedup_vs_default": {n: {k: round(ref[k] / m[k], 3) for k in keys} for n, m in med.items()},
            "peak_rss_mb": {n: round(max(x["peak_rss_mb"] for x in v)) for n, v in got.items()},
            "same_losses": all(v == losses["glibc_default"] for v in losses.values()),
            "final_losses": losses}


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return {}
    res = run(a)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
