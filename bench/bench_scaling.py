"""Benchmark how a whole tiny iteration grows with the number of prompts (issue 7, item 5).

For each N the command ``python -m ospo.run --stage all --config configs/tiny.yaml --limit N``
runs stages 1-5 in this process (after one untimed warm-up run) (prompts, perturb and vqa from supplied inputs, so random weights cannot
stall them; images and train run the model) in a fresh run directory, timed
(wall clock, model load included: it lands in the intercept). The supplied
inputs are the tiny config's records repeated under fresh ids up to max(N).

Reported: the fitted slope (seconds per prompt, ``numpy.polyfit`` degree 1), R^2 of that
line, and a degree-2 fit whose quadratic term is given relative to the linear one at the
largest N (``quad_rel = |a2| * N_max / |a1|``): a hidden quadratic step (dedupe, resume
scans, merging) shows up as a low R^2 and a large ``quad_rel``. Stage 5 runs a fixed
``train.max_steps`` (the tiny config's 2), so its cost is part of the intercept.

    python bench/bench_scaling.py --quick        # N = 2, 4, 8
    python bench/bench_scaling.py                # N = 8, 16, 32, 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny"
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N = 2, 4, 8")
    p.add_argument("--sizes", help="comma list of prompt counts (default 8,16,32,64; quick 2,4,8)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run (smoke tests)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in each run")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def _read(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


TEXT_FIELDS = ("prompt", "perturbed", "dense", "perturbed_dense")


def _suffixed(rec: dict, suffix: str) -> dict:
    """A copy of a prompt or variant record with ``suffix`` on every prompt text in it."""
    out = {k: (v + suffix if k in TEXT_FIELDS and isinstance(v, str) else v) for k, v in rec.items()}
    if isinstance(rec.get("variants"), list):
        out["variants"] = [_suffixed(v, suffix) for v in rec["variants"]]
    return out


def write_inputs(dest: Path, n: int) -> dict:
    """The tiny config's prompts/variants/questions repeated under fresh ids until n prompts.

    Each repeat after the first gets its own text (``", copy r"`` after every prompt text): stage
    1 drops prompts whose text it has seen, so plain copies would leave the work flat in N.
    """
    prompts, variants, questions = _read(TINY / "prompts.jsonl"), _read(TINY / "variants.jsonl"), \
        _read(TINY / "questions.jsonl")
    var_by, q_by = {r["id"]: r for r in variants}, {r["id"]: r for r in questions}
    out = {"prompts": [], "variants": [], "questions": []}
    for i in range(n):
        src = prompts[i % len(prompts)]
        r = i // len(prompts)
        suffix = f", copy {r}" if r else ""
        new_id = f"{src.get('id', 'p')}-r{i:04d}"
        out["prompts"].append({**_suffixed(src, suffix), "id": new_id})
        if src.get("id") in var_by:
            out["variants"].append({**_suffixed(var_by[src["id"]], suffix), "id": new_id})
        if src.get("id") in q_by:
            out["questions"].append({**q_by[src["id"]], "id": new_id})
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for k, rows in out.items():
        paths[k] = dest / f"{k}.jsonl"
        paths[k].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def fit(ns: list[int], secs: list[float]) -> dict:
    import numpy as np

    x, y = np.asarray(ns, float), np.asarray(secs, float)
    a1, a0 = np.polyfit(x, y, 1)
    pred = a1 * x + a0
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    res = {"slope_s_per_prompt": round(float(a1), 4), "intercept_s": round(float(a0), 3), "r2": round(r2, 4)}
    if len(ns) >= 3:
        q2, q1, _ = np.polyfit(x, y, 2)
        res["quad_coef"] = float(q2)
        res["quad_rel"] = round(abs(float(q2)) * x.max() / max(abs(float(q1)), 1e-12), 4)
    res["linear"] = bool(r2 >= 0.9 and res.get("quad_rel", 0.0) <= 0.5)
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("2,4,8" if args.quick else "8,16,32,64")).split(",")]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import contextlib
    import io

    import torch

    from ospo import run as ospo_run

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        inputs = write_inputs(Path(tmp) / "inputs", max(sizes))

        def once(n: int, tag: str):
            argv = ["--stage", "all", "--config", str(ROOT / "configs" / "tiny.yaml"),
                    "--workdir", str(Path(tmp) / f"run-{tag}"), "--limit", str(n), "run.iterations=1",
                    f"prompts.input={inputs['prompts']}", f"perturb.input={inputs['variants']}",
                    f"vqa.input={inputs['questions']}", f"prompts.num_prompts={n}"]
            buf = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                rc = ospo_run.main(argv)
            return time.perf_counter() - t0, rc, buf.getvalue()

        if not args.no_warmup:
            once(min(sizes), "warmup")  # imports, first-call costs: out of the timed runs
        for n in sizes:
            dt, rc, log = once(n, str(n))
            stages = {ln.split("]")[0][1:]: float(ln.rsplit("(", 1)[1].split()[0])
                      for ln in log.splitlines() if ln.startswith("[") and ln.endswith(" s)")
                      and not ln.startswith("[ospo]")}
            row = {"prompts": n, "seconds": round(dt, 3), "rc": rc, "stage_seconds": stages}
            if rc != 0:
                row["error"] = log[-800:]
            rows.append(row)
            print(f"[bench_scaling] N={n:>3}  {dt:8.2f} s  rc {rc}  {stages}", flush=True)
    ok = [r for r in rows if r["rc"] == 0]
    report = {"sizes": sizes, "rows": rows, "threads": args.threads,
              "what": "wall time of python -m ospo.run --stage all (configs/tiny.yaml, 1 iteration, "
                      "supplied prompts/variants/questions, train.max_steps fixed)"}
    if len(ok) >= 2:
        report["fit"] = fit([r["prompts"] for r in ok], [r["seconds"] for r in ok])
        f = report["fit"]
        print(f"[bench_scaling] slope {f['slope_s_per_prompt']:.3f} s/prompt, intercept {f['intercept_s']:.1f} s, "
              f"R^2 {f['r2']:.3f}, quadratic/linear at N_max {f.get('quad_rel', '-')}")
    else:
        report["fit"] = None
        print("[bench_scaling] too few successful runs to fit", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
