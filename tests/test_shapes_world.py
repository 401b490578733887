"""ShapesWorld: renderer, grammar and ground-truth evaluator.

The evaluator must accept every rendered ground-truth scene and reject every image that
contradicts the prompt in one atomic requirement (colour, shape, count, relation).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from ospo import parsing
from ospo.shapes import evaluate as ev
from ospo.shapes import grammar as gr
from ospo.shapes import world as w

SHIPPED = Path(__file__).resolve().parents[1] / "ospo" / "configs" / "shapes"


def _scenes(n_per_sub: int, seed: int) -> list[tuple[str, w.Scene]]:
    return [(sub, s) for sub in w.COVERED for s in w.sample_scenes(sub, n_per_sub, seed=seed)]


# --- world ---------------------------------------------------------------------------------

def test_sampling_and_rendering_are_deterministic():
    a = w.sample_scenes("complex", 20, seed=3)
    assert a == w.sample_scenes("complex", 20, seed=3)
    assert a != w.sample_scenes("complex", 20, seed=4)
    la, lb = w.sample_layouts(a, seed=3), w.sample_layouts(a, seed=3)
    assert la == lb
    ia = w.render_batch(la)
    assert ia.shape == (20, 64, 64, 3) and ia.dtype == np.uint8
    assert np.array_equal(ia, w.render_batch(lb))
    assert np.array_equal(ia[5], w.render(la[5]))
    assert not np.array_equal(ia, w.render_batch(w.sample_layouts(a, seed=9)))


def test_every_scene_is_valid_and_has_placements():
    for sub, s in _scenes(100, seed=1):
        assert 1 <= s.num_objects <= w.MAX_OBJECTS
        assert w.Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s
        assert len(w.valid_placements(tuple(g.count for g in s.groups), s.relation)) > 0
    with pytest.raises(ValueError):
        w.Scene((w.Group("circle", 1, "red"), w.Group("circle", 1, "red")))   # indistinguishable
    with pytest.raises(ValueError):
        w.Scene((w.Group("circle", 2), w.Group("square", 2)))                 # 4 objects
    with pytest.raises(ValueError):
        w.Scene((w.Group("circle"),), "left of")                               # relation needs 2 groups
    with pytest.raises(ValueError):
        w.sample_scene("texture", random.Random(0))                            # not covered


def test_masks_align_with_the_token_grid():
    scenes = [s for _, s in _scenes(30, seed=2)]
    layouts = w.sample_layouts(scenes, seed=2)
    imgs = w.render_batch(layouts)
    for lay, img in zip(layouts, imgs):
        pm = w.object_masks(lay)
        tm = w.token_masks(pm)
        assert pm.shape == (len(lay.objects), 64, 64) and tm.shape == (len(lay.objects), 8, 8)
        assert not (pm.sum(0) > 1).any(), "objects overlap"
        for k, o in enumerate(lay.objects):
            y0, x0, y1, x1 = o.box
            assert y0 % w.CELL == 0 and x0 % w.CELL == 0 and y1 <= 64 and x1 <= 64
            inside = np.zeros((64, 64), bool)
            inside[y0:y1, x0:x1] = True
            assert pm[k].any() and not (pm[k] & ~inside).any()
            cells = np.zeros((8, 8), bool)
            cells[o.row:o.row + 3, o.col:o.col + 3] = True
            assert tm[k].any() and not (tm[k] & ~cells).any()
            assert (img[pm[k]] == w.PALETTE[o.color]).all()
        # token masks of different objects never share a cell (one free cell between boxes)
        assert not (tm.sum(0) > 1).any()
        # every non-white pixel belongs to an object
        assert np.array_equal((img != 255).any(-1), pm.any(0))
        # row-major flattening lines up with the token sequence: token t = cell (t // 8, t % 8)
        flat = tm.reshape(len(lay.objects), -1)
        o = lay.objects[0]
        centre = (o.row + 1) * 8 + (o.col + 1)      # the middle cell of the 3 x 3 box
        assert flat[0, centre] and tm[0, o.row + 1, o.col + 1]
        assert w.group_token_masks(lay).shape == (len(lay.scene.groups), 8, 8)


def test_layouts_honour_relations_and_colors():
    for sub, s in _scenes(60, seed=5):
        lay = w.sample_layout(s, random.Random(7))
        assert [o.group for o in lay.objects] == [i for i, g in enumerate(s.groups) for _ in range(g.count)]
        for o in lay.objects:
            g = s.groups[o.group]
            assert o.shape == g.shape and (g.color is None or o.color == g.color)
        if s.relation:
            for a in (o for o in lay.objects if o.group == 0):
                for b in (o for o in lay.objects if o.group == 1):
                    assert ev.relation_holds(s.relation, a.center, b.center)


# --- grammar -------------------------------------------------------------------------------

def test_grammar_round_trip_and_objects():
    for i, (sub, s) in enumerate(_scenes(300, seed=8)):
        for rng in (None, random.Random(i)):
            text = gr.describe(s, rng)
            assert gr.parse(text) == s, text
            assert gr.parse(text.upper() + ".") == s
            assert gr.parse(text + " on a white background") == s
            objs = gr.objects(s)
            assert parsing.validate_objects(text, objs, max_objects=6) is None
            assert parsing.split_objects(", ".join(objs)) == objs   # survives stage 1's "Objects:" line


@pytest.mark.parametrize("text", [
    "", "hello", "a red apple", "a purple circle", "two circle", "a circles", "a two circles",
    "four circles", "two circles and two squares",                 # more than three objects
    "a red circle and a red circle", "a circle and two circles",   # groups that cannot be told apart
    "a circle above a square above a triangle", "a circle to the left of",
    "a circle, a square", "a square, and a circle", "a circle and a square and a triangle",
    "a big red circle", "a circle next to a square", "three red circles to the left of a square",
    "a circle left a square", "red circle",
])
def test_parser_rejects_what_is_not_the_worlds_language(text):
    assert gr.parse(text) is None
    assert gr.parse(None) is None


def test_heldout_and_seed_examples_files(tmp_path):
    held = gr.heldout_records()
    assert len(held) == gr.HELDOUT_PER_SUB * len(w.COVERED)
    assert len({r["id"] for r in held}) == len(held)
    scenes = [w.Scene.from_dict(r["scene"]) for r in held]
    assert len(set(scenes)) == len(scenes)
    for r, s in zip(held, scenes):
        assert gr.parse(r["prompt"]) == s and r["objects"] == gr.objects(s)
        assert r["category"] == gr.CATEGORY_OF[r["sub_category"]]
    seeds = gr.seed_example_records()
    assert not {gr.parse(r["prompt"]) for r in seeds} & set(scenes), "seed examples leak held-out scenes"
    # The shipped files are what the code writes today (regenerate: python -m ospo.shapes.grammar).
    gr.main([str(tmp_path)])
    for name in ("heldout.jsonl", "seed_examples.jsonl"):
        assert (tmp_path / name).read_text() == (SHIPPED / name).read_text(), f"{name} is stale"
    # Stage 1 reads the seed examples file as prompts.seed_examples.
    from ospo import config
    from ospo.stages.prompts import seed_examples

    cfg = config.load(None, [f"prompts.seed_examples={SHIPPED / 'seed_examples.jsonl'}"])
    shots = seed_examples(cfg)
    for sub in w.COVERED:
        assert len(shots[sub]) == gr.SEED_EXAMPLES_PER_SUB
        assert all(gr.parse(p) is not None for p, _ in shots[sub])


# --- evaluator -----------------------------------------------------------------------------

def test_evaluator_accepts_every_rendered_scene():
    from scipy.ndimage import gaussian_filter

    pairs = _scenes(60, seed=21)
    layouts = w.sample_layouts([s for _, s in pairs], seed=21)
    imgs = w.render_batch(layouts)
    for (sub, s), lay, img in zip(pairs, layouts, imgs):
        res = ev.evaluate(s, img)
        assert res["correct"], (gr.describe(s), res)
        assert len(res["detections"]) == s.num_objects
    # robust to the softening a VQ round trip brings (blur), and to other sizes
    for (sub, s), img in list(zip(pairs, imgs))[::6]:
        soft = np.clip(gaussian_filter(img.astype(np.float32), (1.5, 1.5, 0)), 0, 255).astype(np.uint8)
        assert ev.evaluate(s, soft)["correct"], gr.describe(s)
        big = w.to_pil(img).resize((384, 384))
        assert ev.evaluate(s, big)["correct"]


def _mismatches(lay: w.Layout) -> list[tuple[str, w.Scene]]:
    """Specs that the layout's picture contradicts in exactly one kind of requirement."""
    s = lay.scene
    out = []
    for i, g in enumerate(s.groups):

        def with_group(new, i=i):
            gs = list(s.groups)
            gs[i] = new
            return w.Scene(tuple(gs), s.relation) if w.is_valid(gs, s.relation) else None

        drawn_colors = {o.color for o in lay.objects if o.shape == g.shape}
        for c in w.COLORS:
            if c not in drawn_colors:
                out.append(("color", with_group(w.Group(g.shape, g.count, c))))
        drawn_shapes = {o.shape for o in lay.objects}
        for sh in w.SHAPES:
            if sh not in drawn_shapes:
                out.append(("shape", with_group(w.Group(sh, g.count, g.color))))
        for c in (g.count - 1, g.count + 1):
            if 1 <= c <= 3 and s.num_objects - g.count + c <= 3:
                out.append(("count", with_group(w.Group(g.shape, c, g.color))))
    if s.relation:
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        out.append(("relation", w.Scene(s.groups, flip[s.relation])))
        out.append(("relation", w.Scene(s.groups[::-1], s.relation)))
    return [(k, x) for k, x in out if x is not None]


def test_evaluator_rejects_mismatched_specs():
    pairs = _scenes(16, seed=31)
    layouts = w.sample_layouts([s for _, s in pairs], seed=31)
    imgs = w.render_batch(layouts)
    kinds = set()
    n = 0
    for lay, img in zip(layouts, imgs):
        dets = ev.detect(img)
        for kind, wrong in _mismatches(lay):
            res = ev.check(wrong, dets)
            assert not res["correct"], (kind, gr.describe(lay.scene), gr.describe(wrong))
            failed = {r["kind"] for r in res["requirements"] if not r["ok"]}
            if kind == "relation":
                assert failed == {"relation"}
            kinds.add(kind)
            n += 1
    assert kinds == {"color", "shape", "count", "relation"} and n > 200


def test_evaluator_on_a_blank_and_on_a_wrong_image():
    s = gr.parse("two red circles to the left of a blue square")
    blank = np.full((64, 64, 3), 255, np.uint8)
    res = ev.evaluate(s, blank)
    assert not res["correct"] and res["detections"] == []
    # the same objects, positions exchanged
    right = w.Layout(s, (w.Obj(0, "circle", "red", 0, 0), w.Obj(0, "circle", "red", 4, 0), w.Obj(1, "square", "blue", 2, 4)))
    wrong = w.Layout(s, (w.Obj(0, "circle", "red", 0, 4), w.Obj(0, "circle", "red", 4, 4), w.Obj(1, "square", "blue", 2, 0)))
    assert ev.evaluate(s, w.render(right))["correct"]
    res = ev.evaluate(s, w.render(wrong))
    assert not res["correct"] and [r["kind"] for r in res["requirements"] if not r["ok"]] == ["relation"]


def test_image_inputs_of_every_kind():
    import torch

    lay = w.sample_layout(gr.parse("a green triangle above a yellow square"), random.Random(0))
    img = w.render(lay)
    f01 = img.astype(np.float32) / 255
    for x in (img, w.to_pil(img), f01, f01 * 2 - 1, torch.from_numpy(f01).permute(2, 0, 1), w.to_pil(img).resize((128, 128))):
        assert ev.evaluate(lay.scene, x)["correct"]


def test_detected_token_mask_matches_the_true_mask():
    for _, s in _scenes(10, seed=41):
        lay = w.sample_layout(s, random.Random(1))
        truth = w.token_masks(w.object_masks(lay)).any(0)
        got = ev.detected_token_mask(s, w.render(lay))
        assert ev.mask_iou(truth, got) == 1.0


def test_evaluate_images_aggregates_per_category():
    a = gr.parse("a red circle")
    b = gr.parse("two squares")
    img_a = w.render(w.sample_layout(a, random.Random(0)))
    img_b = w.render(w.sample_layout(b, random.Random(0)))
    recs = [
        {"id": "1", "sub_category": "color", "scene": a.to_dict(), "image": img_a},        # right
        {"id": "2", "sub_category": "color", "prompt": "a red circle", "image": img_b},    # wrong
        {"id": "3", "sub_category": "numeracy", "prompt": "two squares", "image": img_b},  # right
        {"id": "4", "sub_category": "numeracy", "prompt": "a dog on a sofa", "image": img_b},  # ungradeable
    ]
    s = ev.evaluate_images(recs)
    assert s["sub_category"] == {"color": 0.5, "numeracy": 1.0}
    assert s["category"] == {"attribute": 0.5, "layout": 1.0}
    assert s["overall"] == pytest.approx(0.75)          # GenEval: mean over sub-categories
    assert s["overall_images"] == pytest.approx(2 / 3)
    assert (s["n"], s["graded"], s["ungradeable"]) == (4, 3, 1)
    assert s["counts"] == {"color": 2, "numeracy": 1}
    assert "summary" not in s and ev.format_summary(s)


def test_cli_samples_and_grades_with_a_checkpoint(tiny_model_dir, tmp_path):
    """The evaluation command end to end on a random tiny Janus (its images are noise, so
    only the plumbing is checked: every image graded, files written, noise not taken for
    objects)."""
    prompts = tmp_path / "p.jsonl"
    gr.write_jsonl(prompts, gr.heldout_records()[::80][:2] + [{"id": "junk", "sub_category": "color", "prompt": "a cat"}])  # --limit 2 leaves the junk out
    out = tmp_path / "eval"
    s = ev.main(["--checkpoint", tiny_model_dir, "--prompts", str(prompts), "--out", str(out), "--seeds", "2",
                 "--batch-size", "8", "--limit", "2"])
    assert (s["n"], s["graded"], s["ungradeable"]) == (4, 4, 0)
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all((out / r["image"]).exists() for r in recs)
    assert len({r["seed"] for r in recs}) == 4
    assert json.loads((out / "summary.json").read_text())["graded"] == 4


def test_questions_follow_the_requirements():
    from ospo import parsing as P

    s = gr.parse("two red circles to the left of a square")
    assert [q["question"] for q in gr.questions(s)] == [
        "Are there circles?", "Are the circles red?", "Are there two red circles?", "Is there a square?",
        "Are the red circles to the left of the square?"]
    text = "\n".join("Q: " + q["question"] for q in gr.questions(s))
    assert P.parse_questions(text, min_questions=1, max_questions=10)[0] is not None   # stage 4's parser
    for lay in w.sample_layouts([x for _, x in _scenes(6, seed=51)], seed=51)[:30]:
        dets = ev.detect(w.render(lay))
        assert all(gr.answers(lay.scene, ev.check(lay.scene, dets)["requirements"]))
        for _, wrong in _mismatches(lay):
            res = ev.check(wrong, dets)
            truth = gr.answers(wrong, res["requirements"])
            assert len(truth) == len(gr.questions(wrong))
            # a count of one is not asked, so a wrong single count may leave every answer "yes"
            assert not all(truth) or any(r["kind"] == "count" and not r["ok"] for r in res["requirements"])
