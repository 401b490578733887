"""Does one OSPO iteration make the ShapesWorld Janus better, and which parts matter?

    python -m ospo.shapes.improve --out DIR [--seeds 0 1 2]
        [--ablations no_masks no_sft no_filter no_densify oracle_filter]
        [--limit N] [--eval-limit N] [--eval-seeds K] [--yes-no N] [--iterations 1]

One command for the whole table:

1. the base model (``shapes:``, the shipped checkpoint) on the held-out prompts
   (:mod:`ospo.shapes.evaluate`: fixed seeds, never used in training);
2. per seed, one OSPO iteration with the default config (``configs/shapes.yaml``,
   ``run.seed`` = the seed) in ``DIR/runs/s<seed>/ospo``, and each ablation as a branch of it
   (``--from``: the stages before the changed one are reused, not regenerated):

   - ``no_masks``: ``train.alpha=0`` (plain SimPO + SFT: no object weighting; paper sec. 5.1)
   - ``no_sft``: ``train.sft_weight=0`` (sec. 5.1)
   - ``no_filter``: ``vqa.filter=false`` (both filter rules off; sec. 5.1)
   - ``no_densify``: ``perturb.densify=false`` (sec. 5.1.3)
   - ``oracle_filter`` (ours, a diagnostic the paper cannot run): the ``no_filter`` branch's
     pairs with the self-VQA judge replaced by the world's truth, keeping only the pairs whose
     chosen image is correct and rejected image wrong (:func:`oracle_pairs`). It measures what
     the same training gives with a perfect judge, the ceiling of stage 4's filter. Needs
     ``no_filter``.

3. every trained checkpoint on the same held-out prompts and seeds;
4. what the loop produced, graded by the world's truth (:func:`loop_stats`): prompts kept,
   pairs surviving each filter rule, preference-null and preference-false rates, the
   self-VQA filter's precision and recall, self-written prompts that coincide with
   held-out ones (reported; the held-out score is also given without them);
5. ``DIR/improve.json`` (every number) and ``DIR/improve.png`` (per category: base vs OSPO vs
   ablations, error bars = standard deviation over seeds).

``--iterations 2`` adds a second OSPO iteration (``ospo`` only) to ask whether a second
round gains again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "no_masks": ("train", ["train.alpha=0"]),
    "no_sft": ("train", ["train.sft_weight=0"]),
    "no_filter": ("vqa", ["vqa.filter=false"]),
    "no_densify": ("perturb", ["perturb.densify=false"]),
}
ORACLE = "oracle_filter"
CHOICES = [*ABLATIONS, ORACLE]


def _run(argv: list[str]) -> None:
    from ospo import run

    print(f"[improve] python -m ospo.run {' '.join(argv)}", file=sys.stderr, flush=True)
    rc = run.main(argv)
    if rc != 0:
        raise RuntimeError(f"ospo.run exited {rc}: {' '.join(argv)}")


def _evaluate(checkpoint: str, out: Path, a) -> dict:
    from ospo.shapes import evaluate as ev

    if (out / "summary.json").exists():            # resumable: a finished evaluation is kept
        return json.loads((out / "summary.json").read_text())
    argv = ["--checkpoint", checkpoint, "--out", str(out), "--seeds", str(a.eval_seeds), "--yes-no", str(a.yes_no)]
    if a.eval_limit:
        argv += ["--limit", str(a.eval_limit)]
    print(f"[improve] python -m ospo.shapes.evaluate {' '.join(argv)}", file=sys.stderr, flush=True)
    return ev.main(argv)


def _heldout_overlap_ids(summary_dir: Path, run_dir: Path, iteration: int) -> set[str]:
    """Held-out prompt ids whose scene the run's self-written prompts (iterations up to
    ``iteration``: the data the evaluated checkpoint was trained on) also describe."""
    from ospo.rundir import read_jsonl
    from ospo.shapes import grammar as gr

    written = set()
    for it in sorted(run_dir.glob("iter_*"))[: iteration + 1]:
        if (it / "prompts.jsonl").exists():
            written |= {s for s in (gr.parse(p["prompt"]) for p in read_jsonl(it / "prompts.jsonl")) if s is not None}
    return {r["id"] for r in gr.heldout_records() if gr.Scene.from_dict(r["scene"]) in written}


def _accuracy_without(eval_dir: Path, drop: set[str]) -> float | None:
    """Overall held-out accuracy (GenEval's mean over sub-categories) without some prompt ids."""
    from ospo.shapes.evaluate import summarize

    recs = [json.loads(x) for x in (eval_dir / "results.jsonl").read_text().splitlines() if x.strip()]
    keep = [r for r in recs if r.get("id") not in drop]
    return summarize(keep)["overall"] if keep else None


def loop_stats(run_dir: Path, iteration: int = 0) -> dict:
    """What one iteration produced, graded by the world's truth."""
    from ospo.rundir import read_jsonl
    from ospo.shapes import grammar as gr
    from ospo.shapes.evaluate import evaluate

    it = run_dir / f"iter_{iteration:02d}"
    man = {s: json.loads((it / f"{s}.manifest.json").read_text()) for s in ("prompts", "perturb", "images", "vqa", "train")
           if (it / f"{s}.manifest.json").exists()}
    prompts = read_jsonl(it / "prompts.jsonl")
    scenes = [gr.parse(p["prompt"]) for p in prompts]
    held = gr.heldout_scenes()
    out = {"prompts_written": len(prompts),
           "prompts_gradeable": sum(s is not None for s in scenes),
           "prompts_heldout_scene": sum(s is not None and s in held for s in scenes),
           "rejects": {s: m.get("rejects", {}) for s, m in man.items()},
           "counts": {s: m.get("counts", {}) for s, m in man.items()}}
    if "vqa" in man:
        extra = man["vqa"].get("extra", {})
        out["vqa"] = {k: extra[k] for k in ("pairs_scored", "pairs_removed_by_rule", "pairs_kept", "prompts_survived",
                                            "mean_S_chosen", "mean_S_rejected", "mean_S_chosen_kept",
                                            "mean_S_rejected_kept") if k in extra}
    # Grade every scored pair against the ORIGINAL prompt's scene: the truth of "preferred".
    pairs = []
    for rec in read_jsonl(it / "vqa.jsonl"):
        scene = gr.parse(rec["prompt"])
        if scene is None or not rec.get("images"):
            continue
        ok = {(im["k"], im["side"]): evaluate(scene, str(run_dir / im["image"]))["correct"] for im in rec["images"]}
        for p in rec.get("pairs", []):
            c, r = ok.get((p["k"], "orig")), ok.get((p["k"], "pert"))
            if c is None or r is None:
                continue
            pairs.append({"chosen_ok": c, "rejected_ok": r, "passed": not p["rules"], "kept": p["status"] == "kept"})

    def rates(ps):
        n = len(ps)
        if not n:
            return {"n": 0}
        return {"n": n,
                "preference_null": round(sum(p["chosen_ok"] == p["rejected_ok"] for p in ps) / n, 4),
                "preference_false": round(sum(p["rejected_ok"] and not p["chosen_ok"] for p in ps) / n, 4),
                "preference_true": round(sum(p["chosen_ok"] and not p["rejected_ok"] for p in ps) / n, 4),
                "chosen_correct": round(sum(p["chosen_ok"] for p in ps) / n, 4)}

    out["pairs_scored"] = rates(pairs)
    out["pairs_kept"] = rates([p for p in pairs if p["kept"]])
    good = [p["chosen_ok"] and not p["rejected_ok"] for p in pairs]
    passed = [p["passed"] for p in pairs]
    tp = sum(g and s for g, s in zip(good, passed))
    out["filter"] = {"precision": round(tp / sum(passed), 4) if sum(passed) else None,
                     "recall": round(tp / sum(good), 4) if sum(good) else None,
                     "passed": sum(passed), "truly_good": sum(good), "of": len(pairs)}
    if (it / "oracle.json").exists():      # an oracle_filter branch: what the truth kept (oracle_pairs)
        out["oracle"] = json.loads((it / "oracle.json").read_text())
    return out


def oracle_pairs(run_dir: Path, iteration: int = 0) -> dict:
    """Keep, in ``run_dir``'s ``pairs.jsonl``, only the preference-true pairs: chosen image
    correct and rejected image wrong for the ORIGINAL prompt's scene (the world's evaluator).
    Pairs whose prompt is not in the world's grammar are dropped (ungradeable). Writes
    ``oracle.json`` next to it (counts) and returns it; a second call keeps the first result."""
    from ospo.rundir import atomic_write_json, read_jsonl, write_jsonl_atomic
    from ospo.shapes import grammar as gr
    from ospo.shapes.evaluate import evaluate

    it = run_dir / f"iter_{iteration:02d}"
    done = it / "oracle.json"
    if done.exists():
        return json.loads(done.read_text())
    pairs = read_jsonl(it / "pairs.jsonl")
    keep, ungradeable = [], 0
    for p in pairs:
        scene = gr.parse(p["prompt"])
        if scene is None:
            ungradeable += 1
            continue
        ok = [evaluate(scene, str(run_dir / p[side]["image"]))["correct"] for side in ("chosen", "rejected")]
        if ok[0] and not ok[1]:
            keep.append(p)
    if not keep:
        raise RuntimeError(f"oracle_filter: no preference-true pair among the {len(pairs)} in {it / 'pairs.jsonl'}")
    write_jsonl_atomic(it / "pairs.jsonl", keep)
    info = {"pairs_in": len(pairs), "pairs_kept": len(keep), "ungradeable": ungradeable}
    atomic_write_json(done, info)
    return info


def _oracle_branch(no_filter: Path, wd: Path, common: list[str], limit: list[str]) -> None:
    """Branch ``no_filter`` before training, swap its pairs for :func:`oracle_pairs`, train."""
    from ospo import run as R
    from ospo.rundir import branch

    ov = [*common, *ABLATIONS["no_filter"][1]]
    if not (wd / "iter_00" / "oracle.json").exists():
        cfg = R.load_config(R.parse_args(["--stage", "all", "--iterations", "1", *ov]))
        print(f"[improve] oracle_filter: branch of {no_filter} before train, pairs judged by the world's truth",
              file=sys.stderr, flush=True)
        branch(no_filter, wd, "train", cfg.stage_view, 0)
        oracle_pairs(wd, 0)
    _run(["--stage", "all", "--workdir", str(wd), "--iteration", "0", "--iterations", "1", *limit, *ov])


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def _chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(result["base"]["sub_category"]) + ["overall"]
    names = ["base"] + list(result["variants"])
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(cats)), 3.6))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        if name == "base":
            vals = [result["base"]["sub_category"].get(c, result["base"]["overall"]) if c != "overall"
                    else result["base"]["overall"] for c in cats]
            err = None
        else:
            v = result["variants"][name]
            vals = [v["mean"].get(c, float("nan")) for c in cats]
            err = [v["sd"].get(c, 0.0) for c in cats]
        ax.bar(np.arange(len(cats)) + j * width, vals, width, yerr=err, label=name, capsize=2)
    ax.set_xticks(np.arange(len(cats)) + 0.4 - width / 2)
    ax.set_xticklabels(cats)
    ax.set_ylabel("ground-truth accuracy")
    tops = [result["base"]["overall"], *result["base"]["sub_category"].values()]
    tops += [m + sd for v in result["variants"].values() for m, sd in zip(v["mean"].values(), v["sd"].values())
             if m == m and sd == sd]
    ax.set_ylim(0, min(1.0, max(0.2, 1.25 * max(tops))))
    ax.legend(fontsize=7, ncol=len(names))
    ax.set_title("ShapesWorld held-out accuracy: base vs one OSPO iteration and its ablations"
                 + (" (ospo_iter2: two iterations)" if "ospo_iter2" in result["variants"] else "")
                 + "; error bars: sd over seeds", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m ospo.shapes.improve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ablations", nargs="*", default=CHOICES, choices=CHOICES)
    ap.add_argument("--limit", type=int, default=None, help="cap prompts per OSPO iteration (quick runs)")
    ap.add_argument("--eval-limit", type=int, default=None, help="first N held-out prompts only (quick runs)")
    ap.add_argument("--eval-seeds", type=int, default=2, help="images per held-out prompt")
    ap.add_argument("--yes-no", type=int, default=400, help="held-out yes/no items per evaluation")
    ap.add_argument("--iterations", type=int, default=1, choices=[1, 2])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    a = ap.parse_args(argv)
    if ORACLE in a.ablations and "no_filter" not in a.ablations:
        ap.error(f"--ablations {ORACLE} branches from no_filter: name both")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    limit = ["--limit", str(a.limit)] if a.limit else []
    result: dict = {"command": "python -m ospo.shapes.improve " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "seeds": a.seeds, "ablations": a.ablations, "runs": {}}
    base = _evaluate("shapes:", out / "eval" / "base", a)
    result["base"] = base
    per: dict[str, list[dict]] = {"ospo": [], **{ab: [] for ab in a.ablations}}
    if a.iterations == 2:
        per["ospo_iter2"] = []
    for s in a.seeds:
        src = out / "runs" / f"s{s}" / "ospo"
        common = [f"run.seed={s}", *a.set]
        # --iteration 0: a rerun of the command resumes these iterations instead of adding more
        _run(["--stage", "all", "--workdir", str(src), "--iteration", "0", "--iterations", str(a.iterations),
              *limit, *common])
        runs = {"ospo": (src, 0)}
        if a.iterations == 2:
            runs["ospo_iter2"] = (src, 1)
        for ab in sorted(a.ablations, key=lambda x: x == ORACLE):   # the oracle needs no_filter first
            wd = out / "runs" / f"s{s}" / ab
            if ab == ORACLE:
                _oracle_branch(out / "runs" / f"s{s}" / "no_filter", wd, common, limit)
                runs[ab] = (wd, 0)
                continue
            stage, ov = ABLATIONS[ab]
            # --iteration 0: the ablation changes the FIRST iteration (without it a branch starts
            # from the source's latest iteration, i.e. the second one under --iterations 2)
            _run(["--stage", "all", "--from", str(src), "--from-stage", stage, "--iteration", "0",
                  "--workdir", str(wd), "--iterations", "1", *limit, *common, *ov])
            runs[ab] = (wd, 0)
        for name, (wd, it) in runs.items():
            ev_dir = out / "eval" / f"s{s}-{name}"
            summ = _evaluate(str(wd / f"iter_{it:02d}" / "checkpoint"), ev_dir, a)
            overlap = _heldout_overlap_ids(ev_dir, wd, it)
            entry = {"seed": s, "run": str(wd), "iteration": it, "summary": summ,
                     "heldout_overlap": len(overlap), "overall_without_overlap": _accuracy_without(ev_dir, overlap),
                     "base_overall_without_overlap": _accuracy_without(out / "eval" / "base", overlap),
                     "loop": loop_stats(wd, it)}
            per[name].append(entry)
            result["runs"][f"s{s}-{name}"] = entry
    result["variants"] = {}
    for name, entries in per.items():
        cats = list(base["sub_category"]) + ["overall"]
        vals = {c: [e["summary"]["sub_category"].get(c) if c != "overall" else e["summary"]["overall"] for e in entries]
                for c in cats}
        ms = {c: _mean_sd(v) for c, v in vals.items()}
        result["variants"][name] = {"mean": {c: m for c, (m, _) in ms.items()}, "sd": {c: sd for c, (_, sd) in ms.items()},
                                    "gain_overall": ms["overall"][0] - base["overall"],
                                    "yes_no": _mean_sd([e["summary"].get("yes_no", {}).get("accuracy") if e["summary"].get("yes_no") else None for e in entries])[0],
                                    "mask_iou": _mean_sd([(e["summary"].get("mask_iou") or {}).get("mean") for e in entries])[0]}
    # A rerun resumes (finished runs and evaluations are kept): "seconds" is this invocation,
    # "seconds_total" adds the earlier invocations that wrote this directory.
    result["seconds"] = round(time.perf_counter() - t0, 1)
    prev = out / "improve.json"
    prev_total = json.loads(prev.read_text()).get("seconds_total", 0.0) if prev.exists() else 0.0
    result["seconds_total"] = round(prev_total + result["seconds"], 1)
    (out / "improve.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    _chart(result, out / "improve.png")
    print(format_table(result))
    return result


def format_table(result: dict) -> str:
    base = result["base"]
    cats = list(base["sub_category"]) + ["overall"]
    lines = ["| model | " + " | ".join(cats) + " | yes/no | mask IoU |", "|---" * (len(cats) + 3) + "|"]
    row = [f"{base['sub_category'].get(c, 0):.3f}" if c != "overall" else f"**{base['overall']:.3f}**" for c in cats]
    yn = (base.get("yes_no") or {}).get("accuracy")
    mi = (base.get("mask_iou") or {}).get("mean")
    lines.append("| base | " + " | ".join(row) + f" | {yn if yn is None else f'{yn:.3f}'} | {mi if mi is None else f'{mi:.3f}'} |")
    for name, v in result["variants"].items():
        row = [f"{v['mean'][c]:.3f} ± {v['sd'][c]:.3f}" for c in cats]
        lines.append(f"| {name} | " + " | ".join(row) + f" | {v['yes_no']:.3f} | {v['mask_iou']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
