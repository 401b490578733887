"""Scale-out bench (issue 8): wall time of stages 1-4 on the tiny model, 1 process vs 2
processes under torchrun (gloo), same config and seed, and whether the merged outputs agree.

    python bench/bench_ranks.py [--limit 8] [--out bench/results]

This machine has 2 cores: one process already uses both (torch intra-op threads), so two
processes (1 thread each) cannot be much faster here; the number says what the sharding
costs (process start, model load per rank, merge), not the speedup on GPUs, where each rank
has its own device. Each launch includes Python start-up and model loading: at tiny sizes
those fixed costs dominate.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["prompts", "perturb", "images", "vqa"]
OUTPUTS = ["prompts.jsonl", "variants.jsonl", "images.jsonl", "vqa.jsonl", "pairs.jsonl"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(workdir: Path, procs: int, limit: int, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    for stage in STAGES:
        cmd = [sys.executable, "-m", "ospo.run", "--config", str(ROOT / "configs" / "tiny.yaml"), "--stage", stage,
               "--workdir", str(workdir), "--limit", str(limit)]
        if procs > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_port", str(_port()), *cmd[1:]]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        t1 = _run(one, 1, a.limit, threads=os.cpu_count() or 1)
        t2 = _run(two, 2, a.limit, threads=max(1, (os.cpu_count() or 2) // 2))
        same = {f: (one / "iter_00" / f).read_bytes() == (two / "iter_00" / f).read_bytes() for f in OUTPUTS}
    res = {"bench": "ranks", "stages": STAGES, "limit": a.limit, "cpu_count": os.cpu_count(),
           "seconds_1proc": round(t1, 2), "seconds_2proc": round(t2, 2), "speedup": round(t1 / t2, 3),
           "outputs_identical": same,
           "note": "2 cores: one process already uses both; includes start-up and model load per launch"}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "bench_ranks.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
