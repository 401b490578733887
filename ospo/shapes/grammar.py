"""ShapesWorld's English: scene -> prompt, prompt -> scene, and the prompt files ospo reads.

The language is small and regular so that a tiny model can learn it and every prompt it
writes can be graded:

    prompt   := phrase
              | phrase " and " phrase
              | phrase ", " phrase " and " phrase
              | phrase " " relation " " phrase
    phrase   := ("a" | "an" | "one") [color] shape       (one object)
              | ("two" | "three") [color] shape "s"       (several)
    relation := "to the left of" | "to the right of" | "above" | "below"

optionally followed by a backdrop that is always true in this world ("on a white
background"), which densification may add. :func:`parse` accepts exactly this language
(case, surrounding spaces and a final period aside) and returns ``None`` for anything else,
including sentences that are well formed but describe an invalid scene (more than three
objects, two groups that cannot be told apart, a number that disagrees with its noun): an
unparsable prompt is ungradeable, never guessed.

Sub-categories covered (ospo.templates names): color, shape, spatial_2d, numeracy, complex.
Not covered, see :data:`NOT_COVERED`.

Files for ospo (``python -m ospo.shapes.grammar OUT_DIR`` writes both):

- ``seed_examples.jsonl``: ``prompts.seed_examples`` for stage 1 (``sub_category``,
  ``category``, ``prompt``, ``objects``), the format :func:`ospo.stages.prompts.seed_examples`
  reads.
- ``heldout.jsonl``: the held-out evaluation prompts (fixed seed, disjoint from the seed
  examples): ``id``, ``category``, ``sub_category``, ``prompt``, ``objects``, ``scene``.
  Training data must exclude these scenes: :func:`heldout_scenes`.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from ospo.shapes.world import COLORS, COVERED, SHAPES, Group, Scene, sample_scene, scene_rng

NOT_COVERED: dict[str, str] = {
    "texture": "a texture needs more pixels than a 3 x 3-token object has; stripes or dots at "
               "8 px per token would be the VQ's bottleneck, not the generator's",
    "spatial_3d": "front/behind needs occlusion, which breaks the one-region-per-object "
                  "detection the evaluator relies on; left for a later version",
    "non_spatial": "shapes do not act on each other; a relation a picture can show (inside) "
                   "needs nested objects, left for a later version",
}

CATEGORY_OF: dict[str, str] = {"color": "attribute", "shape": "attribute", "spatial_2d": "layout",
                               "numeracy": "layout", "complex": "complex"}

REL_TEXT: dict[str, str] = {"left of": "to the left of", "right of": "to the right of",
                            "above": "above", "below": "below"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_NUM = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
BACKDROPS = ("on a white background", "on a plain white background")

HELDOUT_SEED = 777_001
HELDOUT_PER_SUB = 40
SEED_EXAMPLES_SEED = 777_002
SEED_EXAMPLES_PER_SUB = 3


# --- scene -> English ------------------------------------------------------------------

def noun(g: Group) -> str:
    return g.shape if g.count == 1 else g.shape + "s"


def phrase(g: Group, *, one: bool = False) -> str:
    det = ("one" if one else "a") if g.count == 1 else NUMBER_WORDS[g.count]
    return " ".join(w for w in (det, g.color, noun(g)) if w)


def describe(scene: Scene, rng: random.Random | None = None) -> str:
    """The prompt for a scene. With an rng, a single object is sometimes "one" instead of "a"
    next to a counted group (the only free choice of the language)."""
    counted = any(g.count > 1 for g in scene.groups)
    phr = [phrase(g, one=bool(rng is not None and counted and rng.random() < 0.5)) for g in scene.groups]
    if scene.relation is not None:
        return f"{phr[0]} {REL_TEXT[scene.relation]} {phr[1]}"
    if len(phr) == 1:
        return phr[0]
    return ", ".join(phr[:-1]) + " and " + phr[-1]


def objects(scene: Scene) -> list[str]:
    """The ``objects`` field: each group's noun as written ("circle", "squares"), deduplicated."""
    out: list[str] = []
    for g in scene.groups:
        if noun(g) not in out:
            out.append(noun(g))
    return out


# --- English -> scene ------------------------------------------------------------------

_PHRASE = re.compile(
    r"^(?P<det>a|an|one|two|three|1|2|3) (?:(?P<color>" + "|".join(COLORS) + r") )?"
    r"(?P<shape>" + "|".join(SHAPES) + r")(?P<plural>s?)$")
_REL = re.compile(r" (" + "|".join(re.escape(t) for t in sorted(REL_TEXT.values(), key=len, reverse=True)) + r") ")
_REL_OF = {t: r for r, t in REL_TEXT.items()}


def _parse_phrase(text: str) -> Group | None:
    m = _PHRASE.match(text)
    if m is None:
        return None
    det = m["det"]
    count = int(det) if det.isdigit() else _NUM[det]
    if (count == 1) == bool(m["plural"]):      # "a circles", "two circle"
        return None
    if det in ("a", "an") and count != 1:
        return None
    return Group(m["shape"], count, m["color"])


def _clean(text: str) -> str:
    t = re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .")
    for b in BACKDROPS:
        if t.endswith(" " + b):
            t = t[: -len(b) - 1].rstrip(" ,")
    return t


def parse(text: str) -> Scene | None:
    """The scene a prompt of this world describes, or None when it is not one."""
    if not isinstance(text, str):
        return None
    t = _clean(text)
    if not t:
        return None
    rels = _REL.findall(t)
    if len(rels) > 1:
        return None
    if rels:
        left, right = _REL.split(t, maxsplit=1)[0], _REL.split(t, maxsplit=1)[2]
        parts, relation = [left, right], _REL_OF[rels[0]]
    else:
        relation = None
        head, sep, last = t.rpartition(" and ")
        if sep:
            parts = head.split(", ") + [last]
        else:
            parts = [t]
        if len(parts) > 3:
            return None
    groups = [_parse_phrase(p) for p in parts]
    if any(g is None for g in groups):
        return None
    try:
        return Scene(tuple(groups), relation)
    except ValueError:
        return None


# --- yes/no questions (stage 4's decomposition, in ospo.templates.decomposition's style) ---

def _np_the(g: Group, with_color: bool) -> str:
    return " ".join(w for w in ("the", g.color if with_color else None, noun(g)) if w)


def questions(scene: Scene) -> list[dict]:
    """The yes/no questions that check a scene, one per requirement the evaluator checks
    (``kind``, ``group`` as in :func:`ospo.shapes.evaluate.check`), worded like the
    decomposition template's example ("Are there apples?", "Are the apples red?", "Are there
    two apples?", "Is there a cup?", "Are the apples to the left of the cup?"). Counts of one
    are not asked (the template does not ask them); a colour is asked as "Is there a red
    circle?" where another group has the same shape."""
    out, seen = [], set()
    shared = {g.shape for g in scene.groups if sum(h.shape == g.shape for h in scene.groups) > 1}
    for i, g in enumerate(scene.groups):
        be, plural = ("Are", True) if g.count > 1 else ("Is", False)
        qs = [("object", f"{be} there {'' if plural else 'a '}{noun(g)}?")]
        if g.color is not None:
            if g.shape in shared:
                qs.append(("color", f"{be} there {'' if plural else 'a '}{g.color} {noun(g)}?"))
            else:
                qs.append(("color", f"{be} {_np_the(g, False)} {g.color}?"))
        if g.count > 1:
            qs.append(("count", f"Are there {NUMBER_WORDS[g.count]} {' '.join(w for w in (g.color, noun(g)) if w)}?"))
        for kind, q in qs:
            if q not in seen:
                seen.add(q)
                out.append({"kind": kind, "group": i, "question": q})
    if scene.relation is not None:
        a, b = scene.groups
        be = "Are" if a.count > 1 else "Is"
        q = f"{be} {_np_the(a, True)} {REL_TEXT[scene.relation]} {_np_the(b, True)}?"
        out.append({"kind": "relation", "group": None, "question": q})
    return out


def answers(scene: Scene, requirements: list[dict]) -> list[bool]:
    """The truth of each of :func:`questions` (scene) given the evaluator's requirement
    results for an image (``check(scene, detections)["requirements"]``)."""
    ok = {(r["kind"], r["group"]): r["ok"] for r in requirements}
    return [ok[(q["kind"], q["group"])] for q in questions(scene)]


# --- prompt records and files ----------------------------------------------------------

def record(scene: Scene, sub_category: str, rid: str, rng: random.Random | None = None) -> dict:
    return {"id": rid, "category": CATEGORY_OF[sub_category], "sub_category": sub_category,
            "prompt": describe(scene, rng), "objects": objects(scene), "scene": scene.to_dict()}


def _distinct(sub: str, n: int, seed: int, tag: str, exclude: set[Scene]) -> list[tuple[Scene, random.Random]]:
    out, seen, i = [], set(exclude), 0
    while len(out) < n:
        rng = scene_rng(seed, tag, sub, i)
        s = sample_scene(sub, rng)
        i += 1
        if s not in seen:
            seen.add(s)
            out.append((s, rng))
        if i > 200 * n:
            raise RuntimeError(f"only {len(out)} distinct {sub} scenes")
    return out


def heldout_records(per_sub: int = HELDOUT_PER_SUB, seed: int = HELDOUT_SEED) -> list[dict]:
    """The held-out evaluation prompts: ``per_sub`` distinct scenes per covered sub-category
    (distinct across sub-categories too), each with its prompt, objects and scene."""
    recs, used = [], set()
    for sub in COVERED:
        picked = _distinct(sub, per_sub, seed, "heldout", used)
        used.update(s for s, _ in picked)
        recs += [record(s, sub, f"heldout-{sub}-{i:03d}", rng) for i, (s, rng) in enumerate(picked)]
    return recs


def heldout_scenes(per_sub: int = HELDOUT_PER_SUB, seed: int = HELDOUT_SEED) -> set[Scene]:
    """Scenes that training data must never show (the held-out set's)."""
    return {Scene.from_dict(r["scene"]) for r in heldout_records(per_sub, seed)}


def seed_example_records(per_sub: int = SEED_EXAMPLES_PER_SUB, seed: int = SEED_EXAMPLES_SEED) -> list[dict]:
    """In-context seed examples for stage 1, per covered sub-category, none held out."""
    held = heldout_scenes()
    recs = []
    for sub in COVERED:
        picked = _distinct(sub, per_sub, seed, "seed_examples", held)
        for i, (s, rng) in enumerate(picked):
            r = record(s, sub, f"seed-{sub}-{i}", rng)
            recs.append({k: r[k] for k in ("sub_category", "category", "prompt", "objects")})
    return recs


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(p)
    return p


def write_seed_examples(path: str | Path, per_sub: int = SEED_EXAMPLES_PER_SUB) -> Path:
    return write_jsonl(path, seed_example_records(per_sub))


def write_heldout(path: str | Path, per_sub: int = HELDOUT_PER_SUB) -> Path:
    return write_jsonl(path, heldout_records(per_sub))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "ospo/configs/shapes")
    print(write_seed_examples(out / "seed_examples.jsonl"))
    print(write_heldout(out / "heldout.jsonl"))


if __name__ == "__main__":
    main()
