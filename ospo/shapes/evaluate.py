"""Ground-truth evaluation in ShapesWorld: does an image show what its prompt asks for?

Pure part (no model): :func:`detect` finds the objects of an image: nearest-palette colour
classes, ``skimage.measure.label`` + ``regionprops`` per colour, and as shape the template
(circle, square, upright triangle) fitted to the region's bounding box that overlaps it
best; "unknown" when even that fit is poor or size and aspect are not an object's, so noise
blobs never count as objects. (Template fitting rather than extent thresholds: a blurred
triangle loses its apex and reaches a circle's extent.) :func:`check` tests every atomic
requirement of the scene against the detections and calls the image correct when all hold
(GenEval's rule); :func:`evaluate_images` aggregates accuracy per sub-category, per
category and overall.

Requirements per group i (``kind``): ``object`` (some object of the shape), ``color`` (some
object of the shape and colour, when a colour is asked), ``count`` (exactly ``count``
objects of the shape and colour; other shapes or colours do not count against it), and,
for a scene with a relation, ``relation``: every matching object of group 0 stands in the
relation to every matching object of group 1, on region centroids: the offset along the
relation's axis is at least ``REL_MIN_PX`` and larger than the offset across it (the
renderer's rule, with the slack that centroids of triangles need).

Measured (2 shared CPU cores): 100% on 2,000 rendered ground-truth scenes (400 per covered
sub-category), and 100% on the same scenes after a Gaussian blur of sigma 1, 1.5 or 2 (what
a VQ round trip does to edges), JPEG quality 30, pixel noise sigma 20, or a 64 -> 32 -> 64 px
round trip, or upscaled to 384 px; 70% after 64 -> 16 -> 64 px (4 px per pixel: expected to
fail). No blob of a random model's noise passes as an object. 2-5 ms per image.

CLI (samples held-out prompts with a checkpoint and grades them)::

    python -m ospo.shapes.evaluate --checkpoint PATH_OR_tiny: \\
        --prompts ospo/configs/shapes/heldout.jsonl --out DIR [--seeds N] [--guidance-scale 1.5] \\
        [--yes-no 400] [--masks | --no-masks] [--skip-layers 1]

Writes ``DIR/images/<id>_<j>.png``, ``DIR/results.jsonl`` (one record per image with the
per-requirement details) and ``DIR/summary.json`` (accuracy per sub-category, per
category, overall), and prints the summary. Seeds: image j of prompt ``id`` gets
``derive_seed(seed, "shapes-eval", id, j)``, independent of batching.

Two more measurements go into ``summary.json``:

- ``yes_no``: the model's yes/no accuracy on held-out questions (:func:`yes_no_items`,
  :func:`yes_no_accuracy`), scored on the stage-4 path (:func:`ospo.understanding.yes_no_probs`,
  answer "yes" when p(yes) > p(no)). Per record of the same ``--prompts`` file: one
  ground-truth render of its scene, and questions from :func:`ospo.shapes.grammar.questions`
  of the scene and of one replace / swap / drop perturbation of it
  (:func:`ospo.shapes.tasks.perturb_scene`), each with its truth on that render from the
  evaluator (:func:`check` + :func:`ospo.shapes.grammar.answers`), picked half true, half
  false where the record allows. ``--yes-no N`` items in all (0: off), spread evenly over
  the records; per item ``DIR/yes_no.jsonl`` holds the question, truth, answer, p(yes), p(no).
  Reports ``accuracy``, ``balanced_accuracy`` (mean of the accuracies on true and on false
  items, so always-yes scores 0.5), ``kind_balanced_accuracy`` (the same within each
  question kind, then averaged over kinds: an answerer that reads only the question's form
  scores 0.5, which plain accuracy does not guarantee here, as object questions are mostly
  true and colour questions mostly false), ``by_kind`` and ``yes_rate``.
- ``mask_iou`` (``--masks``, on by default): attention captured while sampling exactly as
  stage 3 does it (:mod:`ospo.stages.images`: the scene's object words located in the fed
  prompt, attention over layers ``[s, L - s)`` with s = ``--skip-layers`` clamped to the
  model, per object Otsu, union), compared per image with :func:`detected_token_mask` (the
  token cells of the detected objects the scene names) by :func:`mask_iou`. Each record of
  ``results.jsonl`` gets ``mask_iou``, ``mask_note``, ``attention_mask`` and
  ``detected_mask`` (8 x 8, 0/1). ``mask_iou`` is None when there is nothing to compare:
  the evaluator detects no named object AND the attention mask is empty (mask_iou's 1.0 for
  two empty masks would reward an image without objects); an attention mask with no
  detected object under it scores 0. The summary's ``mask_iou`` has ``mean`` over scored
  images, ``n``, ``skipped`` (None) and ``mean_detected`` / ``n_detected`` (only images in
  which the evaluator found a named object: attention quality apart from generation
  failures). A model whose token grid is not 8 x 8 has its mask resampled to 8 x 8
  (nearest cell centre) first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ospo.shapes.world import BACKGROUND, GRID, PALETTE, SIZE, Scene, to_pil, token_masks

COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
_REFS = np.array([BACKGROUND] + [PALETTE[c] for c in COLOR_NAMES], dtype=np.float32)  # class 0 = background

# Thresholds, measured on renders (sharp, blurred, JPEG, noisy) and on a random model's noise.
MAX_COLOR_DIST = 110.0          # a pixel farther than this from every palette colour is ignored
MIN_AREA = 80                   # px; smaller regions are noise (objects are 200-324 px)
MAX_AREA = 560                  # px; larger regions are merged objects -> shape "unknown"
MAX_ASPECT = 1.6                # bounding boxes of objects are about square
MIN_FIT = 0.7                   # IoU with the best shape template fitted to the region's box;
                                # below it the region is "unknown". Renders blurred with sigma 2
                                # still fit >= 0.85 (2.5: 0.78); noise blobs of a random model <= 0.69
REL_MIN_PX = 8.0                # one token cell


@dataclass
class Detection:
    shape: str                  # circle / square / triangle / unknown
    color: str
    area: int
    centroid: tuple[float, float]     # (y, x) px in the 64 px frame
    bbox: tuple[int, int, int, int]   # (y0, x0, y1, x1)
    extent: float                     # area / bounding-box area
    fit: float                        # IoU with the template of ``shape`` (best template if unknown)
    mask: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "area": self.area,
                "centroid": [round(self.centroid[0], 2), round(self.centroid[1], 2)],
                "bbox": list(self.bbox), "extent": round(self.extent, 3), "fit": round(self.fit, 3)}


# --- images ------------------------------------------------------------------------------

def as_array(image) -> np.ndarray:
    """An RGB uint8 (64, 64, 3) array from a PIL image, a path, a uint8 or float array
    (HWC or CHW; floats in [0, 1] or [-1, 1]) or a torch tensor. Other sizes are resized
    (area averaging when shrinking)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        im = image.convert("RGB")
    else:
        arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
            arr = arr.transpose(1, 2, 0)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected an RGB image, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float32)
            if arr.min() < -1e-3:
                arr = (arr + 1.0) * 127.5
            elif arr.max() <= 1.0 + 1e-3:
                arr = arr * 255.0
            arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        if arr.shape[:2] == (SIZE, SIZE):
            return np.ascontiguousarray(arr)
        im = Image.fromarray(arr, "RGB")
    if im.size != (SIZE, SIZE):
        shrink = im.size[0] > SIZE
        im = im.resize((SIZE, SIZE), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def color_classes(img: np.ndarray) -> np.ndarray:
    """(64, 64) int: 0 background or unclassifiable, k >= 1 the palette colour COLOR_NAMES[k-1]."""
    x = img.astype(np.float32).reshape(-1, 1, 3)
    d = np.sqrt(((x - _REFS[None]) ** 2).sum(-1))  # (P, 1 + colours)
    cls = d.argmin(1)
    cls[d.min(1) > MAX_COLOR_DIST] = 0
    return cls.reshape(img.shape[:2])


# A blur (or a VQ) blunts a triangle's apex: its box loses the tip, so the triangle is also
# fitted with its apex this far (in box heights) above the box.
APEX_CUTS = (0.0, 0.15, 0.3)


def _templates(h: int, w: int) -> dict[str, list[np.ndarray]]:
    """The world's shapes fitted to an h x w box (tested at pixel centres)."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    v, u = (v + 0.5) / h, (u + 0.5) / w
    return {"circle": [(u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25],
            "square": [np.ones((h, w), dtype=bool)],
            "triangle": [np.abs(u - 0.5) <= (v + e) / (1 + e) / 2 for e in APEX_CUTS]}


def shape_of(region: np.ndarray) -> tuple[str, float]:
    """(shape, fit) of a region (its bounding-box crop): the template with the highest IoU
    when that IoU reaches MIN_FIT and size and aspect are an object's, else "unknown"."""
    h, w = region.shape
    area = int(region.sum())
    fits = {k: max(mask_iou(region, t) for t in ts) for k, ts in _templates(h, w).items()}
    best = max(fits, key=fits.get)
    if area > MAX_AREA or max(h, w) > MAX_ASPECT * min(h, w) or fits[best] < MIN_FIT:
        return "unknown", fits[best]
    return best, fits[best]


def detect(image, *, keep_masks: bool = False) -> list[Detection]:
    """The objects in an image, one per connected region of one palette colour."""
    from skimage.measure import label, regionprops

    img = as_array(image)
    cls = color_classes(img)
    out: list[Detection] = []
    for k, name in enumerate(COLOR_NAMES, 1):
        m = cls == k
        if m.sum() < MIN_AREA:
            continue
        for r in regionprops(label(m, connectivity=1)):
            if r.area < MIN_AREA:
                continue
            y0, x0, y1, x1 = r.bbox
            mask = None
            if keep_masks:
                mask = np.zeros(cls.shape, dtype=bool)
                mask[y0:y1, x0:x1] = r.image
            shape, fit = shape_of(r.image)
            cy, cx = (float(c) for c in r.centroid)
            out.append(Detection(shape, name, int(r.area), (cy, cx), (y0, x0, y1, x1), float(r.extent), fit, mask))
    return out


# --- requirements ------------------------------------------------------------------------

def relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Does a centroid ``a`` (y, x) stand in ``rel`` to ``b``?"""
    dy, dx = b[0] - a[0], b[1] - a[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return along >= REL_MIN_PX and abs(across) < along


def _what(g) -> str:
    return " ".join(w for w in (g.color, g.shape) if w)


def check(scene: Scene, dets: list[Detection]) -> dict:
    """Every requirement of the scene against the detections; ``correct`` when all hold."""
    reqs = []
    matches = []
    for i, g in enumerate(scene.groups):
        of_shape = [d for d in dets if d.shape == g.shape]
        match = [d for d in of_shape if g.color is None or d.color == g.color]
        matches.append(match)
        reqs.append({"kind": "object", "group": i, "what": g.shape, "found": len(of_shape), "ok": len(of_shape) > 0})
        if g.color is not None:
            reqs.append({"kind": "color", "group": i, "what": _what(g), "found": len(match), "ok": len(match) > 0})
        reqs.append({"kind": "count", "group": i, "what": f"{g.count} {_what(g)}", "found": len(match),
                     "ok": len(match) == g.count})
    if scene.relation is not None:
        a, b = matches[0], matches[1]
        ok = bool(a and b) and all(relation_holds(scene.relation, x.centroid, y.centroid) for x in a for y in b)
        reqs.append({"kind": "relation", "group": None,
                     "what": f"{_what(scene.groups[0])} {scene.relation} {_what(scene.groups[1])}", "ok": ok})
    return {"correct": all(r["ok"] for r in reqs), "requirements": reqs}


def evaluate(scene: Scene | dict, image) -> dict:
    """Grade one image: ``correct``, ``requirements`` (each with ``ok``), ``detections``."""
    if isinstance(scene, dict):
        scene = Scene.from_dict(scene)
    dets = detect(image)
    res = check(scene, dets)
    res["detections"] = [d.to_dict() for d in dets]
    return res


def detected_token_mask(scene: Scene, image, min_frac: float = 0.1) -> np.ndarray:
    """(8, 8) bool union of the token cells of the detected objects that the scene's groups
    name (by shape and colour): the reference for attention masks of generated images."""
    dets = detect(image, keep_masks=True)
    keep = [d for d in dets if any(d.shape == g.shape and (g.color is None or d.color == g.color)
                                   for g in scene.groups)]
    if not keep:
        return np.zeros((GRID, GRID), dtype=bool)
    return token_masks(np.stack([d.mask for d in keep]), min_frac).any(0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


# --- aggregation -------------------------------------------------------------------------

def _scene_of(rec: dict) -> Scene | None:
    if rec.get("scene") is not None:
        s = rec["scene"]
        return s if isinstance(s, Scene) else Scene.from_dict(s)
    from ospo.shapes.grammar import parse

    return parse(rec.get("prompt", ""))


def summarize(results: list[dict]) -> dict:
    """Accuracy from graded records (``correct`` True/False, or None = ungradeable), each
    with ``sub_category`` (and optionally ``category``).

    ``overall`` is GenEval's: the mean of the sub-categories' accuracies; ``overall_images``
    is the fraction of all graded images. Ungradeable records (prompts outside the world's
    language) are counted, never scored.
    """
    from ospo.shapes.grammar import CATEGORY_OF

    by_sub: dict[str, list[bool]] = {}
    by_cat: dict[str, list[bool]] = {}
    by_req: dict[str, list[bool]] = {}
    ungradeable = 0
    for r in results:
        if r.get("correct") is None:
            ungradeable += 1
            continue
        sub = r.get("sub_category") or "unspecified"
        cat = r.get("category") or CATEGORY_OF.get(sub, "unspecified")
        by_sub.setdefault(sub, []).append(bool(r["correct"]))
        by_cat.setdefault(cat, []).append(bool(r["correct"]))
        for q in r.get("requirements", []):
            by_req.setdefault(q["kind"], []).append(bool(q["ok"]))
    acc = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    graded = [c for v in by_sub.values() for c in v]
    return {
        "overall": float(np.mean([acc(v) for v in by_sub.values()])) if by_sub else float("nan"),
        "overall_images": acc(graded),
        "sub_category": {k: acc(v) for k, v in sorted(by_sub.items())},
        "category": {k: acc(v) for k, v in sorted(by_cat.items())},
        "requirement": {k: acc(v) for k, v in sorted(by_req.items())},
        "counts": {k: len(v) for k, v in sorted(by_sub.items())},
        "n": len(results), "graded": len(graded), "ungradeable": ungradeable,
    }


def grade(records: list[dict]) -> list[dict]:
    """Per record (``scene`` or a ``prompt`` to parse; ``image``: array, PIL image or path),
    the graded record: its ``id``/``category``/``sub_category``/``prompt`` plus ``correct``
    (None when the prompt does not parse) and ``requirements``."""
    out = []
    for rec in records:
        base = {k: rec[k] for k in ("id", "category", "sub_category", "prompt", "seed") if k in rec}
        scene = _scene_of(rec)
        if scene is None:
            out.append(dict(base, correct=None, reason="prompt_not_in_world_language"))
            continue
        res = evaluate(scene, rec["image"])
        out.append(dict(base, **res))
    return out


def evaluate_images(records: list[dict]) -> dict:
    """Per-category accuracy of images against their scenes (see :func:`summarize`)."""
    return summarize(grade(records))


# --- yes/no questions on held-out scenes ----------------------------------------------------

YES_NO_OPS = ("replace", "swap", "drop")


def yes_no_candidates(record: dict, *, seed: int = 0) -> tuple[np.ndarray, list[dict]] | None:
    """(image, candidates) of one held-out record, or None when its prompt is not a scene.

    The image is one ground-truth render of the record's scene (layout drawn from
    ``scene_rng(seed, "yes-no", id)``); the candidates are the grammar's questions of the
    scene (``source`` "own") and of one perturbation per operation (``source`` the op, rng
    ``scene_rng(seed, "yes-no", id, op)``), deduplicated by wording (first kept), each with
    its ``truth`` on the image: :func:`ospo.shapes.grammar.answers` of the question's scene
    given :func:`check` of that scene against the image's detections.
    """
    from ospo.shapes import grammar
    from ospo.shapes.tasks import perturb_scene
    from ospo.shapes.world import render, sample_layout, scene_rng

    scene = _scene_of(record)
    if scene is None:
        return None
    rid = record.get("id")
    image = render(sample_layout(scene, scene_rng(seed, "yes-no", rid)))
    dets = detect(image)
    scenes = [("own", scene)]
    for op in YES_NO_OPS:
        other = perturb_scene(scene, op, scene_rng(seed, "yes-no", rid, op))
        if other is not None:
            scenes.append((op, other))
    out, seen = [], set()
    for source, sc in scenes:
        truths = grammar.answers(sc, check(sc, dets)["requirements"])
        for q, t in zip(grammar.questions(sc), truths):
            if q["question"] not in seen:
                seen.add(q["question"])
                out.append({"question": q["question"], "kind": q["kind"], "truth": bool(t), "source": source})
    return image, out


def yes_no_items(records: list[dict], *, seed: int = 0, per_record: int = 4, limit: int | None = None) -> list[dict]:
    """Yes/no items on ground-truth renders of held-out records (see :func:`yes_no_candidates`).

    Per record up to ``per_record`` questions, drawn alternately from its true and its false
    candidates (each shuffled by ``scene_rng(seed, "yes-no-pick", id)``; records start
    alternately with true and with false, so an odd ``per_record`` stays balanced over the
    set), the other side filling in where one runs out. Each item: ``id``,
    ``sub_category``, ``question``, ``kind``, ``truth`` (bool), ``source`` (own / op),
    ``image`` (uint8 64 x 64 x 3, shared by the items of a record). ``limit`` keeps that
    many items, taking each record's first item before any record's second (so a cut
    spreads over the records and keeps the balance). Records whose prompt is not a scene
    are skipped. Deterministic in (records, seed, per_record, limit).
    """
    from ospo.shapes.world import scene_rng

    ranked: list[tuple[int, int, dict]] = []
    n_rec = 0
    for rec in records:
        got = yes_no_candidates(rec, seed=seed)
        if got is None:
            continue
        image, cands = got
        rng = scene_rng(seed, "yes-no-pick", rec.get("id"))
        sides = [[c for c in cands if c["truth"]], [c for c in cands if not c["truth"]]]
        for side in sides:
            rng.shuffle(side)
        turn = n_rec % 2     # 0: a true item first, 1: a false one
        picked = []
        while len(picked) < per_record and (sides[0] or sides[1]):
            side = sides[turn] if sides[turn] else sides[1 - turn]
            picked.append(side.pop(0))
            turn = 1 - turn
        for rank, c in enumerate(picked):
            ranked.append((rank, n_rec, {"id": rec.get("id"), "sub_category": rec.get("sub_category"),
                                         "question": c["question"], "kind": c["kind"], "truth": c["truth"],
                                         "source": c["source"], "image": image}))
        n_rec += 1
    if limit is not None and len(ranked) > limit:
        keep = {(r, n) for r, n, _ in sorted(ranked, key=lambda x: (x[0], x[1]))[: max(0, limit)]}
        ranked = [x for x in ranked if (x[0], x[1]) in keep]
    return [it for _, _, it in ranked]


def yes_no_summary(items: list[dict], said_yes: list[bool]) -> dict:
    """Accuracy of yes/no answers (``said_yes[i]`` for ``items[i]``, each with ``truth`` and
    ``kind``): ``n``, ``accuracy``, ``balanced_accuracy`` (mean of the accuracies on true
    and on false items; the one present when only one kind of item is),
    ``kind_balanced_accuracy`` (per question kind with both true and false items, the mean of
    its accuracies on true and on false items; then the mean over those kinds: an answerer
    that reads only the question's form, e.g. "yes" to every "Is there a ...?", scores 0.5
    on it whatever the mix of the set), ``accuracy_true``,
    ``accuracy_false``, ``n_true``, ``n_false``, ``by_kind`` and ``yes_rate``. NaN for
    what has no item."""
    if len(items) != len(said_yes):
        raise ValueError("one answer per item")
    acc = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    right = [bool(a) == bool(it["truth"]) for it, a in zip(items, said_yes)]
    on_true = [c for c, it in zip(right, items) if it["truth"]]
    on_false = [c for c, it in zip(right, items) if not it["truth"]]
    by_kind: dict[str, list[bool]] = {}
    for c, it in zip(right, items):
        by_kind.setdefault(it["kind"], []).append(c)
    parts = [acc(v) for v in (on_true, on_false) if v]
    per_kind = []
    for kind in sorted({it["kind"] for it in items}):
        t = [c for c, it in zip(right, items) if it["kind"] == kind and it["truth"]]
        f = [c for c, it in zip(right, items) if it["kind"] == kind and not it["truth"]]
        if t and f:
            per_kind.append((acc(t) + acc(f)) / 2)
    return {"n": len(items), "accuracy": acc(right),
            "balanced_accuracy": float(np.mean(parts)) if parts else float("nan"),
            "kind_balanced_accuracy": float(np.mean(per_kind)) if per_kind else float("nan"),
            "accuracy_true": acc(on_true), "accuracy_false": acc(on_false),
            "n_true": len(on_true), "n_false": len(on_false),
            "by_kind": {k: acc(v) for k, v in sorted(by_kind.items())},
            "yes_rate": acc([bool(a) for a in said_yes])}


def yes_no_accuracy(engine, items: list[dict], *, batch_size: int = 32, details: list | None = None) -> dict:
    """Score yes/no items (:func:`yes_no_items`) with the model on stage 4's path,
    :func:`ospo.understanding.yes_no_probs`: the answer is "yes" when p(yes) > p(no). The
    questions about one image go into one entry, so each image is encoded once. Returns
    :func:`yes_no_summary`; with ``details`` (a list) one row per item is appended to it
    (``id``, ``question``, ``kind``, ``source``, ``truth``, ``answer``, ``p_yes``, ``p_no``)."""
    from ospo import understanding

    groups: dict[tuple, tuple[np.ndarray, list[int]]] = {}
    for k, it in enumerate(items):
        img = as_array(it["image"])
        groups.setdefault((it.get("id"), img.tobytes()), (img, []))[1].append(k)
    entries = list(groups.values())
    p_yes, p_no = [0.0] * len(items), [0.0] * len(items)
    if entries:
        scores = understanding.yes_no_probs(engine, [to_pil(img) for img, _ in entries],
                                            [[items[k]["question"] for k in ks] for _, ks in entries],
                                            batch_size=batch_size)
        for (_, ks), sc in zip(entries, scores):
            for k, a, b in zip(ks, sc.p_yes, sc.p_no):
                p_yes[k], p_no[k] = float(a), float(b)
    said = [a > b for a, b in zip(p_yes, p_no)]
    if details is not None:
        for it, a, b, y in zip(items, p_yes, p_no, said):
            details.append({k: it.get(k) for k in ("id", "sub_category", "question", "kind", "source")}
                           | {"truth": bool(it["truth"]), "answer": "yes" if y else "no", "p_yes": a, "p_no": b})
    return yes_no_summary(items, said)


def vq_round_trip(engine, items: list[dict], *, batch_size: int = 64) -> list[dict]:
    """``items`` with each image replaced by its round trip through the model's own VQ
    (encode -> tokens -> decode: what an image the model generated looks like, which is
    what stage 4 judges). Items that shared an image share its round trip; the questions and
    truths are kept (the truth is read off the render: the question is about the scene)."""
    import torch

    from ospo.shapes import vq as vqm

    imgs: dict[int, np.ndarray] = {}
    for it in items:
        imgs.setdefault(id(it["image"]), as_array(it["image"]))
    keys = list(imgs)
    if not keys:
        return []
    with torch.no_grad():
        out, _ = vqm.reconstruct(engine.model.model.vqmodel, np.stack([imgs[k] for k in keys]), batch_size=batch_size)
    trip = dict(zip(keys, out))
    return [dict(it, image=trip[id(it["image"])]) for it in items]


# --- CLI ---------------------------------------------------------------------------------

def _read_prompts(path: str) -> list[dict]:
    recs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        if "prompt" not in r:
            raise SystemExit(f"ospo: error: {path} line {n} has no 'prompt'")
        r.setdefault("id", f"p{n:05d}")
        recs.append(r)
    return recs


def _to_world_grid(mask: np.ndarray) -> np.ndarray:
    """A square token mask on the world's 8 x 8 grid (nearest cell centre when it is not)."""
    m = np.asarray(mask, dtype=bool)
    if m.shape == (GRID, GRID):
        return m
    idx = ((np.arange(GRID) + 0.5) * m.shape[0] / GRID).astype(int)
    return m[np.ix_(idx, idx)]


def attention_mask_iou(scene: Scene | None, image, soft_maps, objects: list[str], grid: int) -> dict:
    """Stage 3's mask of one image from its per-object soft maps (None: object not found),
    :func:`ospo.masks.image_mask`, against :func:`detected_token_mask`. Returns
    ``mask_iou`` (None when the scene is unknown, or when no named object is detected and
    the attention mask is empty too), ``mask_note``, ``attention_mask`` and
    ``detected_mask`` (8 x 8 lists of 0/1)."""
    from ospo import masks as M

    grids = [None if m is None else np.asarray(m, dtype=np.float32).reshape(grid, grid) for m in soft_maps]
    att, note, _ = M.image_mask(grids, objects, grid)
    att = _to_world_grid(att)
    ref = detected_token_mask(scene, image) if scene is not None else np.zeros((GRID, GRID), dtype=bool)
    iou = None if scene is None or not (att.any() or ref.any()) else mask_iou(att, ref)
    return {"mask_iou": iou, "mask_note": note, "attention_mask": att.astype(int).tolist(),
            "detected_mask": ref.astype(int).tolist()}


def summarize_masks(graded: list[dict]) -> dict:
    """``mean`` / ``n`` of the records' ``mask_iou`` (None skipped, counted in ``skipped``),
    and ``mean_detected`` / ``n_detected`` over the records whose ``detected_mask`` is not
    empty. ``mean`` is None when nothing was scored."""
    scored = [g for g in graded if g.get("mask_iou") is not None]
    det = [g for g in scored if any(any(row) for row in g.get("detected_mask") or [])]
    mean = lambda v: float(np.mean([g["mask_iou"] for g in v])) if v else None  # noqa: E731
    return {"mean": mean(scored), "n": len(scored), "skipped": len(graded) - len(scored),
            "mean_detected": mean(det), "n_detected": len(det)}


def sample_and_grade(engine, prompts: list[dict], *, seeds_per_prompt: int = 1, seed: int = 0,
                     guidance_scale: float = 1.5, temperature: float = 1.0, batch_size: int = 32,
                     image_dir: Path | None = None, masks: bool = False, skip_layers: int = 1) -> list[dict]:
    """Sample ``seeds_per_prompt`` images per prompt record with the engine and grade them.

    With ``masks`` the attention to the scene's object words (:func:`ospo.shapes.grammar.objects`,
    located in the fed prompt by :func:`ospo.masks.find_object_spans`) is captured while
    sampling, as stage 3 does it (layers :func:`ospo.attention.default_layers` of
    ``skip_layers``, clamped to the model; the sampled images are the same as without),
    and every graded record gets :func:`attention_mask_iou`'s fields plus ``mask_layers``.
    """
    from ospo.rundir import derive_seed
    from ospo.sampling import CaptureSpec, decode_images, sample_images

    jobs = [(r, j) for r in prompts for j in range(seeds_per_prompt)]
    ids = engine.image_prompt_ids([r["prompt"] for r, _ in jobs])
    seeds = [derive_seed(seed, "shapes-eval", r["id"], j) for r, j in jobs]
    capture, scenes, objs, layers = None, [], [], None
    if masks:
        from ospo import masks as M
        from ospo.attention import default_layers
        from ospo.shapes.grammar import objects as objects_of

        layers = default_layers(engine.num_layers, skip_layers)
        scenes = [_scene_of(r) for r, _ in jobs]
        objs = [objects_of(sc) if sc is not None else list(r.get("objects") or []) for sc, (r, _) in zip(scenes, jobs)]
        found: dict[tuple, list] = {}
        spans = []
        for i, o in zip(ids, objs):
            key = (tuple(i), tuple(o))
            if key not in found:
                found[key] = M.find_object_spans(i, o, engine.tokenizer)
            spans.append(found[key])
        capture = CaptureSpec(layers=layers, spans=spans)
    samples = sample_images(engine, ids, seeds, guidance_scale=guidance_scale, temperature=temperature,
                            batch_size=batch_size, capture=capture)
    images = decode_images(engine, [s.tokens for s in samples], batch_size=batch_size)
    recs = []
    for (r, j), s, im in zip(jobs, seeds, images):
        rec = dict(r, image=im, seed=s)
        if image_dir is not None:
            image_dir.mkdir(parents=True, exist_ok=True)
            path = image_dir / f"{r['id']}_{j}.png"
            (im if hasattr(im, "save") else to_pil(as_array(im))).save(path)
        recs.append(rec)
    graded = grade(recs)
    for k, (g, (r, j)) in enumerate(zip(graded, jobs)):
        g["sample"] = j
        if masks:
            g.update(attention_mask_iou(scenes[k], images[k], samples[k].maps or [], objs[k], engine.grid),
                     mask_layers=layers)
        if image_dir is not None:
            g["image"] = f"images/{r['id']}_{j}.png"
    return graded


def format_summary(s: dict) -> str:
    lines = [f"{'sub_category':<14}{'n':>6}{'accuracy':>10}"]
    for k, v in s["sub_category"].items():
        lines.append(f"{k:<14}{s['counts'][k]:>6}{v:>10.3f}")
    lines.append(f"{'overall':<14}{s['graded']:>6}{s['overall']:>10.3f}   (images: {s['overall_images']:.3f}, "
                 f"ungradeable: {s['ungradeable']})")
    yn = s.get("yes_no")
    if yn:
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in yn["by_kind"].items())
        lines.append(f"{'yes/no':<14}{yn['n']:>6}{yn['accuracy']:>10.3f}   (balanced: {yn['balanced_accuracy']:.3f}, "
                     f"kind-balanced: {yn.get('kind_balanced_accuracy', float('nan')):.3f}, "
                     f"yes rate: {yn['yes_rate']:.3f}; {kinds})")
    mi = s.get("mask_iou")
    if mi:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"{'mask IoU':<14}{mi['n']:>6}{fmt(mi['mean']):>10}   (images with a detected object: "
                     f"{fmt(mi.get('mean_detected'))} over {mi.get('n_detected', 0)}; skipped: {mi.get('skipped', 0)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m ospo.shapes.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory, hub id, or tiny:")
    ap.add_argument("--prompts", default=str(Path(__file__).resolve().parents[1] / "configs" / "shapes" / "heldout.jsonl"),
                    help="JSONL of prompts (id, sub_category, prompt, optional scene); default: the held-out set")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seeds", type=int, default=1, help="images per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance-scale", type=float, default=1.5,
                    help="CFG weight; 1.5-2 suits a tiny model (shapesworld notes), not Janus-Pro's 5")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="first N prompts only")
    ap.add_argument("--yes-no", type=int, default=400, metavar="N",
                    help="yes/no items on ground-truth renders of the same prompts (0: off)")
    ap.add_argument("--yes-no-images", choices=("render", "vq"), default="render",
                    help="ask the yes/no questions about the render itself, or about its round trip "
                         "through the model's VQ (what a generated image looks like)")
    ap.add_argument("--masks", action=argparse.BooleanOptionalAction, default=True,
                    help="capture attention masks while sampling and report their IoU with the detected objects")
    ap.add_argument("--skip-layers", type=int, default=1,
                    help="attention layers [s, L - s) for masks (clamped to the model; 1 suits the 6-layer model)")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        ap.error("--seeds must be >= 1")
    if a.yes_no < 0:
        ap.error("--yes-no must be >= 0")
    if not Path(a.prompts).exists():
        ap.error(f"--prompts {a.prompts} does not exist")
    prompts = _read_prompts(a.prompts)[: a.limit]

    from ospo.engine import Engine

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[shapes.evaluate] loading {a.checkpoint}", file=sys.stderr)
    engine = Engine.load(path=a.checkpoint)
    print(f"[shapes.evaluate] sampling {len(prompts)} prompts x {a.seeds} seeds (guidance {a.guidance_scale})",
          file=sys.stderr)
    graded = sample_and_grade(engine, prompts, seeds_per_prompt=a.seeds, seed=a.seed, guidance_scale=a.guidance_scale,
                              temperature=a.temperature, batch_size=a.batch_size, image_dir=out / "images",
                              masks=a.masks, skip_layers=a.skip_layers)
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        for g in graded:
            f.write(json.dumps(g) + "\n")
    summary = summarize(graded)
    summary["mask_iou"] = None
    if a.masks:
        summary["mask_iou"] = dict(summarize_masks(graded), layers=graded[0]["mask_layers"] if graded else None,
                                   skip_layers=a.skip_layers)
    summary["yes_no"] = None
    if a.yes_no:
        n_rec = max(1, len(prompts))
        items = yes_no_items(prompts, seed=a.seed, per_record=max(2, -(-a.yes_no // n_rec)), limit=a.yes_no)
        if a.yes_no_images == "vq":
            items = vq_round_trip(engine, items)
        print(f"[shapes.evaluate] scoring {len(items)} yes/no questions ({a.yes_no_images} images)", file=sys.stderr)
        rows: list[dict] = []
        summary["yes_no"] = yes_no_accuracy(engine, items, batch_size=a.batch_size, details=rows)
        summary["yes_no"]["images"] = a.yes_no_images
        with open(out / "yes_no.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    summary.update(checkpoint=a.checkpoint, prompts=a.prompts, seeds=a.seeds, seed=a.seed,
                   guidance_scale=a.guidance_scale, temperature=a.temperature,
                   seconds=round(time.perf_counter() - t0, 2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
