"""ShapesWorld pretraining: what packing and length buckets save per training step.

    python bench/bench_pretrain.py [--checkpoint shapes:] [--repeats 7] [--json OUT]
        [--rows 48] [--per-image 4] [--text-rows 24] [--buckets 2]

Times forward + backward, side by side in one run and in alternation (each repeat runs
every variant once; the medians are compared), of the rows a recipe step carries:

- yes/no rows: ``--rows`` questions as separate rows (the image in every row, as the recipe
  trains them) vs packed ``--per-image`` to an image (:func:`ospo.shapes.packing.packed_lm_loss`);
- text rows: ``--text-rows`` stage-job rows padded to the longest (the recipe) vs in
  ``--buckets`` length buckets (:func:`ospo.shapes.packing.bucketed_lm_loss`).

Each pair is also checked to give the same loss (``loss_rel_diff``). The model is the shipped
ShapesWorld checkpoint by default (any checkpoint of that architecture works; the weights do
not change the cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="shapes:")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--per-image", type=int, default=4)
    p.add_argument("--text-rows", type=int, default=24)
    p.add_argument("--buckets", type=int, default=2)
    p.add_argument("--pack-len", type=int, default=256, help="longest packed text sequence (ospo.shapes.packing.pack_rows)")
    p.add_argument("--pool", type=int, default=200, help="pooled images to draw rows from")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the result dict here")
    return p.parse_args(argv)


def run(a) -> dict:
    import random

    import torch

    from ospo.engine import Engine
    from ospo.shapes import packing
    from ospo.shapes import pretrain as pt
    from ospo.shapes import vq as vqm

    torch.set_num_threads(a.threads)
    eng = Engine.load(path=a.checkpoint)
    model = eng.model
    r = dataclasses.replace(pt.Recipe(), gen_pool=4, und_pool=a.pool, text_rows=a.text_rows)
    rng = random.Random(0)
    b = pt.Batcher(eng, model.model.vqmodel, r, seed_tag="bench", progress=False)
    pad = eng.ids.pad

    def yes_no_inputs():
        groups, pick = packing.group_questions(eng, b, max(1, a.rows // a.per_image), a.per_image, rng)
        pv = vqm.to_pixels(b.und_recon[pick])
        rows = [x for g in groups for x, _ in g]
        starts = [s for g in groups for _, s in g]
        pv_rows = vqm.to_pixels(b.und_recon[[i for i, g in zip(pick, groups) for _ in g]])
        return groups, pv, rows, starts, pv_rows

    variants = {
        "yes_no_separate": lambda x: pt.lm_loss(model, x[2], x[3], pad, x[4]),
        "yes_no_packed": lambda x: packing.packed_lm_loss(model, x[0], pad, x[1]),
        "text_padded": lambda t: pt.lm_loss(model, t[0], t[1], pad),
        "text_buckets": lambda t: packing.bucketed_lm_loss(model, t[0], t[1], pad, buckets=a.buckets),
        "text_packed": lambda t: packing.packed_lm_loss(model, packing.pack_rows(t[0], t[1], a.pack_len), pad, None),
    }
    times = {k: [] for k in variants}
    diffs = {"yes_no": [], "text": []}
    model.train()
    model.model.vqmodel.eval()
    for rep in range(a.repeats + 1):          # the first round warms up and is not counted
        inputs = {"yes_no": yes_no_inputs(), "text": b.text()}
        losses = {}
        for k, f in variants.items():
            x = inputs["text" if k.startswith("text") else "yes_no"]
            t0 = time.perf_counter()
            loss = f(x)
            loss.backward()
            dt = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            losses[k] = loss.item()
            if rep:
                times[k].append(dt)
        diffs["yes_no"].append(abs(losses["yes_no_packed"] - losses["yes_no_separate"]) / losses["yes_no_separate"])
        diffs["text"].append(max(abs(losses[k] - losses["text_padded"]) / losses["text_padded"]
                                 for k in ("text_buckets", "text_packed")))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"checkpoint": a.checkpoint, "repeats": a.repeats, "rows": a.rows, "per_image": a.per_image,
            "text_rows": a.text_rows, "buckets": a.buckets, "pack_len": a.pack_len, "threads": a.threads,
            "seconds_median": {k: round(v, 4) for k, v in med.items()},
            "speedup": {"yes_no_packed": round(med["yes_no_separate"] / med["yes_no_packed"], 2),
                        "text_buckets": round(med["text_padded"] / med["text_buckets"], 2),
                        "text_packed": round(med["text_padded"] / med["text_packed"], 2)},
            "loss_rel_diff_max": {k: max(v) for k, v in diffs.items()}}


def main(argv=None) -> dict:
    a = parse_args(argv)
    res = run(a)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
