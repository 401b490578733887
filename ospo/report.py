"""Helpers for looking at a run by eye (notebooks/attention_masks.ipynb, notebooks/pairs.ipynb).

Everything reads the run directory as the stages wrote it: ``images.jsonl`` (stage 3) with its
``.npz`` soft maps, ``vqa.jsonl`` / ``pairs.jsonl`` and the manifest (stage 4). Figures are
matplotlib only; masks are shown from the stored soft maps (never recomputed from PNGs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ospo import masks
from ospo.rundir import read_jsonl


# --- loading ----------------------------------------------------------------------------------

def iteration_dir(run_dir, iteration: int | None = None, need: str = "images.jsonl") -> Path:
    """``iter_XX`` of ``run_dir``: the given iteration, else the latest one holding ``need``."""
    root = Path(run_dir)
    if iteration is not None:
        return root / f"iter_{iteration:02d}"
    its = sorted(p for p in root.glob("iter_*") if (p / need).exists())
    if not its:
        raise FileNotFoundError(f"no iter_XX/{need} under {root}")
    return its[-1]


def load_jsonl(path) -> list[dict]:
    return list(read_jsonl(Path(path)))


def load_manifest(it_dir, stage: str) -> dict:
    p = Path(it_dir) / f"{stage}.manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}


def ids_in_order(records) -> list[str]:
    """Distinct ids, in file order."""
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r["id"], None)
    return list(seen)


def load_image(run_dir, rel: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(Path(run_dir) / rel).convert("RGB"))


def load_soft_maps(run_dir, rec: dict) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Stored per-object soft maps of an image record: ``(maps (n, g, g), objects, found)``."""
    with np.load(Path(run_dir) / rec["soft_maps"]) as d:
        return d["maps"].astype(np.float32), [str(o) for o in d["objects"]], d["found"].astype(bool)


# --- recomputing a mask -----------------------------------------------------------------------

def mask_from_soft_maps(maps: np.ndarray, objects, found, grid: int) -> np.ndarray:
    """The union of per-object Otsu masks, exactly as stage 3 builds ``mask``."""
    soft = [m if f else None for m, f in zip(maps, found)]
    mask, _, _ = masks.image_mask(soft, list(objects), grid)
    return mask


def recompute_soft_maps(engine, rec: dict) -> list[np.ndarray | None]:
    """One teacher-forced forward over the record's ``input_ids`` + ``tokens`` with its spans and
    layers (:func:`ospo.sampling.teacher_forced_maps`): per object a ``grid x grid`` map."""
    from ospo import sampling

    g = int(rec["grid"])
    row = sampling.teacher_forced_maps(engine, [rec["input_ids"]], [rec["tokens"]], [rec["object_spans"]],
                                       rec["layers"], batch_size=1)[0]
    return [None if m is None else np.asarray(m, np.float32).reshape(g, g) for m in row]


def check_record(run_dir, rec: dict, engine=None, atol: float = 1e-4) -> dict:
    """Recompute one record's mask and compare with what was stored.

    Always: Otsu + union over the stored soft maps must give the stored ``mask``. When the
    record's ``mask_source`` is ``teacher_forced`` and an engine is given, the soft maps are
    also recomputed from ``input_ids``/``tokens``/``object_spans``/``layers`` and compared to
    the stored ones (and the mask rebuilt from them to the stored mask). Sampling-time maps
    cannot be reproduced by a single forward, so they are not recomputed.
    """
    g = int(rec["grid"])
    maps, objects, found = load_soft_maps(run_dir, rec)
    stored = np.asarray(rec["mask"], dtype=np.uint8)
    out = {"mask_from_stored_maps_matches": bool(np.array_equal(mask_from_soft_maps(maps, objects, found, g), stored))}
    if rec.get("mask_source") == "teacher_forced" and engine is not None:
        fresh = recompute_soft_maps(engine, rec)
        same_found = [m is not None for m in fresh] == list(found)
        diff = max((float(np.nanmax(np.abs(a - b))) for a, b, f in zip(fresh, maps, found) if f), default=0.0)
        fmask, _, _ = masks.image_mask(fresh, objects, g)
        out.update(soft_maps_max_abs_diff=diff, soft_maps_match=bool(same_found and diff <= atol),
                   mask_from_recomputed_maps_matches=bool(np.array_equal(fmask, stored)))
    out["matches"] = all(v for k, v in out.items() if k.endswith("matches") or k == "soft_maps_match")
    return out


# --- figures ----------------------------------------------------------------------------------

def _overlay(ax, img, grid_map, title, cmap="jet", alpha=0.5):
    h, w = img.shape[:2]
    ax.imshow(img)
    ax.imshow(grid_map, cmap=cmap, alpha=alpha, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def plot_image_record(run_dir, rec: dict):
    """One row: the decoded image; per object its soft map over the image and its Otsu mask;
    the union mask M. Returns the figure."""
    import matplotlib.pyplot as plt

    img = load_image(run_dir, rec["image"])
    g = int(rec["grid"])
    if rec.get("soft_maps"):
        maps, objects, found = load_soft_maps(run_dir, rec)
    else:
        maps, objects, found = np.zeros((0, g, g)), [], np.zeros(0, bool)
    n = 2 + 2 * len(objects)
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.6), squeeze=False)
    axes = axes[0]
    axes[0].imshow(img)
    axes[0].set_title(f"k{rec['k']} {rec['side']}", fontsize=8)
    axes[0].axis("off")
    for i, (obj, m, f) in enumerate(zip(objects, maps, found)):
        a_soft, a_bin = axes[1 + 2 * i], axes[2 + 2 * i]
        if f:
            _overlay(a_soft, img, m, f"{obj}: soft")
            _overlay(a_bin, img, masks.otsu_mask(m).astype(float), f"{obj}: Otsu", cmap="gray", alpha=0.6)
        else:
            for a in (a_soft, a_bin):
                a.imshow(img)
                a.set_title(f"{obj}: not found", fontsize=8)
                a.axis("off")
    mask = np.zeros((g, g)) if rec.get("mask") is None else np.asarray(rec["mask"], float)
    _overlay(axes[-1], img, mask, f"M ({rec.get('mask_note') or 'ok'})", cmap="gray", alpha=0.6)
    fig.suptitle(rec["prompt_fed"], fontsize=9)
    fig.tight_layout()
    return fig


def plot_pair(run_dir, pair: dict, vqa_rec: dict | None = None):
    """Chosen vs rejected: images with their union masks, titled with the fed prompts and S;
    below, per question p(yes)/p(no) of each image. Returns the figure."""
    import matplotlib.pyplot as plt

    scores = {}
    if vqa_rec is not None:
        for im in vqa_rec.get("images", []):
            if im["k"] == pair["k"]:
                scores[im["side"]] = im
    fig = plt.figure(figsize=(9, 6.5))
    gs = fig.add_gridspec(2, 4, height_ratios=[1.2, 1])
    for col, (name, side, S) in enumerate((("chosen", "orig", pair["S_chosen"]), ("rejected", "pert", pair["S_rejected"]))):
        rec = pair[name]
        img = load_image(run_dir, rec["image"])
        a = fig.add_subplot(gs[0, 2 * col])
        a.imshow(img)
        a.set_title(f"{name} S={S:+.4f}\n{_wrap(rec['prompt_fed'])}", fontsize=7)
        a.axis("off")
        b = fig.add_subplot(gs[0, 2 * col + 1])
        mask = np.zeros(img.shape[:2]) if rec.get("mask") is None else np.asarray(rec["mask"], float)
        _overlay(b, img, mask, f"{name} mask M", cmap="gray", alpha=0.6)
    ax = fig.add_subplot(gs[1, :])
    qs = pair.get("questions") or []
    x = np.arange(len(qs))
    w = 0.2
    for j, (side, label) in enumerate((("orig", "chosen"), ("pert", "rejected"))):
        im = scores.get(side)
        if im is None:
            continue
        ax.bar(x + (2 * j - 1.5) * w, im["p_yes"], w, label=f"{label} p(yes)")
        ax.bar(x + (2 * j - 0.5) * w, im["p_no"], w, label=f"{label} p(no)")
    ax.set_xticks(x)
    ax.set_xticklabels([_wrap(q, 25) for q in qs], fontsize=7)
    ax.legend(fontsize=7)
    fig.suptitle(f"{pair['id']} k{pair['k']}: {pair['prompt']}", fontsize=9)
    fig.tight_layout()
    return fig


def pair_table(pair: dict, vqa_rec: dict | None) -> str:
    """Text table: question, then p(yes) / p(no) / s of the chosen and the rejected image."""
    scores = {im["side"]: im for im in (vqa_rec or {}).get("images", []) if im["k"] == pair["k"]}
    lines = [f"{'question':40s} {'chosen yes/no/s':>26s} {'rejected yes/no/s':>26s}"]
    for i, q in enumerate(pair.get("questions") or []):
        cells = []
        for side in ("orig", "pert"):
            im = scores.get(side)
            cells.append("-" if im is None else f"{im['p_yes'][i]:.4f}/{im['p_no'][i]:.4f}/{im['s'][i]:+.4f}")
        lines.append(f"{q[:40]:40s} {cells[0]:>26s} {cells[1]:>26s}")
    lines.append(f"{'S':40s} {pair['S_chosen']:>+26.4f} {pair['S_rejected']:>+26.4f}")
    return "\n".join(lines)


def plot_s_distributions(vqa_recs, manifest: dict | None = None):
    """Histograms of S over chosen (orig) and rejected (pert) images of all scored pairs, and a
    bar chart of the pairs each filter rule removed (from the vqa manifest)."""
    import matplotlib.pyplot as plt

    s = {"orig": [], "pert": []}
    for r in vqa_recs:
        for im in r.get("images") or []:
            if im.get("S") is not None:
                s[im["side"]].append(im["S"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    vals = s["orig"] + s["pert"]
    bins = np.linspace(min(vals), max(vals), 21) if vals and min(vals) < max(vals) else 10
    a.hist(s["orig"], bins=bins, alpha=0.6, label=f"chosen side (n={len(s['orig'])})")
    a.hist(s["pert"], bins=bins, alpha=0.6, label=f"rejected side (n={len(s['pert'])})")
    a.set_xlabel("S")
    a.set_title("S per image", fontsize=9)
    a.legend(fontsize=7)
    removed = ((manifest or {}).get("extra") or {}).get("pairs_removed_by_rule") or {}
    if not removed:  # no manifest: count from the records
        from collections import Counter

        c = Counter(rule for r in vqa_recs for p in r.get("pairs") or [] for rule in p.get("rules") or [])
        removed = dict(c)
    b.bar(list(removed), list(removed.values()))
    b.set_title("pairs removed per filter rule", fontsize=9)
    b.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int = 40) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text or "", width)) or ""


# --- the HTML report: python -m ospo.report RUN_DIR ---------------------------------------------

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ospo report: {title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}} img{{max-width:100%}}</style></head>
<body><h1>ospo report: {title}</h1>
{body}
</body></html>
"""


def _fig_html(fig) -> str:
    """A matplotlib figure as an embedded PNG (data URI): the page stands alone."""
    import base64
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _yields_table(it_dir: Path) -> str:
    from html import escape

    rows = ["<tr><th>stage</th><th>in</th><th>out</th><th>rejected</th><th>reasons</th><th>seconds</th></tr>"]
    for stage in ("prompts", "perturb", "images", "vqa", "train"):
        m = load_manifest(it_dir, stage)
        if not m:
            continue
        c = m.get("counts", {})
        reasons = ", ".join(f"{k}: {v}" for k, v in (m.get("rejects") or {}).items()) or "-"
        rows.append(f"<tr><td>{stage}</td><td>{c.get('in')}</td><td>{c.get('out')}</td><td>{c.get('rejected')}</td>"
                    f"<td>{escape(reasons)}</td><td>{m.get('seconds')}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _training_curves(log: list[dict]):
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    steps = [r.get("step", i + 1) for i, r in enumerate(log)]
    panels = [("loss", ["loss/total", "loss/simpo", "loss/sft"]), ("reward margin", ["rewards/margins"]),
              ("accuracy", ["rewards/accuracy"])]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            ys = [r.get(k) for r in log]
            if any(y is not None for y in ys):
                ax.plot(steps, [float("nan") if y is None else y for y in ys], marker=".", label=k)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_report(run_dir, out: str | Path | None = None, *, iteration: int | None = None, max_pairs: int = 6) -> Path:
    """Write ``<run_dir>/report.html`` (or ``out``): per iteration, stage yields and reject
    reasons, S histograms and filter-rule counts, example pairs with masks, training curves.
    Every figure is an embedded PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from html import escape

    root = Path(run_dir)
    its = [root / f"iter_{iteration:02d}"] if iteration is not None else sorted(root.glob("iter_[0-9][0-9]"))
    if not its or not any(p.is_dir() for p in its):
        raise FileNotFoundError(f"{root} holds no iter_XX directory: is it an ospo run directory?")
    body = []
    for it in its:
        body.append(f"<h2>{it.name}</h2><h3>Per-stage yields</h3>{_yields_table(it)}")
        vqa_recs = load_jsonl(it / "vqa.jsonl")
        if vqa_recs:
            body.append("<h3>Self-VQA scores</h3>" + _fig_html(plot_s_distributions(vqa_recs, load_manifest(it, "vqa"))))
        pairs = load_jsonl(it / "pairs.jsonl")
        if pairs:
            by_id = {r["id"]: r for r in vqa_recs}
            body.append(f"<h3>Example pairs ({min(len(pairs), max_pairs)} of {len(pairs)})</h3>")
            for p in pairs[:max_pairs]:
                body.append(f"<pre>{escape(pair_table(p, by_id.get(p['id'])))}</pre>"
                            + _fig_html(plot_pair(root, p, by_id.get(p["id"]))))
        log = load_jsonl(it / "train_log.jsonl")
        if log:
            body.append("<h3>Training</h3>" + _fig_html(_training_curves(log)))
    out = Path(out) if out else root / "report.html"
    out.write_text(_PAGE.format(title=escape(str(root)), body="\n".join(body)), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m ospo.report", description="Self-contained HTML report of a run.")
    ap.add_argument("run_dir")
    ap.add_argument("--out", help="output file (default: RUN_DIR/report.html)")
    ap.add_argument("--iteration", type=int)
    ap.add_argument("--max-pairs", type=int, default=6)
    a = ap.parse_args(argv)
    try:
        path = write_report(a.run_dir, a.out, iteration=a.iteration, max_pairs=a.max_pairs)
    except FileNotFoundError as e:
        print(f"ospo: error: {e}", file=sys.stderr)
        return 2
    print(f"[report] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
