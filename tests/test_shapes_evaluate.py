"""ShapesWorld evaluation command: yes/no accuracy on held-out questions and the IoU of
attention masks with the evaluator's detected regions (ospo/shapes/evaluate.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from ospo.shapes import evaluate as ev
from ospo.shapes import grammar as gr
from ospo.shapes import world as w


def _records(step: int = 20) -> list[dict]:
    return gr.heldout_records()[::step]       # 10 records, two per covered sub-category


# --- yes/no items ------------------------------------------------------------------------------

def test_yes_no_items_are_true_on_the_render_balanced_and_deterministic():
    recs = _records()
    items = ev.yes_no_items(recs, seed=3, per_record=4)
    again = ev.yes_no_items(recs, seed=3, per_record=4)
    key = lambda its: [(i["id"], i["question"], i["truth"]) for i in its]  # noqa: E731
    assert key(items) == key(again)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(items, again))
    assert any(not i["truth"] for i in items)
    for rec in recs:
        scene = w.Scene.from_dict(rec["scene"])
        mine = [i for i in items if i["id"] == rec["id"]]
        assert mine and all(i["sub_category"] == rec["sub_category"] for i in mine)
        img = mine[0]["image"]
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
        # the image is the render of the record's own scene, layout from scene_rng(seed, "yes-no", id)
        assert np.array_equal(img, w.render(w.sample_layout(scene, w.scene_rng(3, "yes-no", rec["id"]))))
        assert ev.evaluate(scene, img)["correct"]
        own = {q["question"] for q in gr.questions(scene)}
        for i in mine:
            assert i["kind"] in ("object", "color", "count", "relation")
            if i["question"] in own:
                assert i["truth"], i["question"]     # own-scene questions hold on the ground-truth render
            if not i["truth"]:
                assert i["question"] not in own and i["source"] != "own"
        # balanced: half true, half false as far as the record's candidates allow
        _, cands = ev.yes_no_candidates(rec, seed=3)
        at, af = sum(c["truth"] for c in cands), sum(not c["truth"] for c in cands)
        n_true, n_false = sum(i["truth"] for i in mine), sum(not i["truth"] for i in mine)
        assert n_false == min(af, max(2, 4 - at)) and n_true == min(at, max(2, 4 - af)), (rec["prompt"], at, af)
        assert len({i["question"] for i in mine}) == len(mine)
    n_true = sum(i["truth"] for i in items)
    assert abs(n_true - (len(items) - n_true)) <= len(items) // 4


def test_yes_no_truths_match_an_independent_oracle():
    """A single red circle: a question is true exactly when it asks for circles (any number
    word but two/three), red or no colour; every other colour, shape or count is false."""
    other_shapes = [s for s in w.SHAPES if s != "circle"]
    other_colors = [c for c in w.COLORS if c != "red"]
    seen_false = 0
    for seed in range(8):
        _, cands = ev.yes_no_candidates({"id": "x", "prompt": "a red circle"}, seed=seed)
        for c in cands:
            words = c["question"].rstrip("?").lower().split()
            truth = (not any(s in words or s + "s" in words for s in other_shapes)
                     and not any(col in words for col in other_colors)
                     and "two" not in words and "three" not in words)
            assert c["truth"] == truth, c
            seen_false += not truth
    assert seen_false >= 3


def test_yes_no_items_limit_spreads_over_records_and_skips_non_scenes():
    recs = _records(40) + [{"id": "junk", "sub_category": "color", "prompt": "a cat on a sofa"}]
    items = ev.yes_no_items(recs, per_record=4, limit=5)
    assert len(items) == 5 and sorted(i["id"] for i in items) == sorted(r["id"] for r in recs[:5])
    odd = ev.yes_no_items(_records(), per_record=3)
    n_true = sum(i["truth"] for i in odd)
    assert abs(n_true - (len(odd) - n_true)) <= 2    # odd per_record: records alternate the extra side


# --- yes/no accuracy ---------------------------------------------------------------------------

def _stub_yes_no_probs(monkeypatch, answer):
    """Replace stage 4's scorer by one that answers ``answer(truth)`` from the items' truth,
    and record its calls."""
    from ospo import understanding

    calls = []

    def fake(engine, images, questions, *, batch_size=32, mode="prefix"):
        calls.append({"images": images, "questions": questions, "batch_size": batch_size})
        out = []
        for im, qs in zip(images, questions):
            arr = np.asarray(im)
            ys = [0.8 if answer(TRUTH[(arr.tobytes(), q)]) else 0.1 for q in qs]
            out.append(understanding.ImageScore(ys, [0.45] * len(qs)))
        return out

    monkeypatch.setattr(understanding, "yes_no_probs", fake)
    return calls


TRUTH: dict = {}


def test_yes_no_accuracy_scores_through_yes_no_probs(monkeypatch):
    items = ev.yes_no_items(_records()[:4], per_record=4)
    TRUTH.clear()
    TRUTH.update({(i["image"].tobytes(), i["question"]): i["truth"] for i in items})
    frac_true = float(np.mean([i["truth"] for i in items]))

    calls = _stub_yes_no_probs(monkeypatch, lambda t: t)
    details: list = []
    r = ev.yes_no_accuracy(None, items, batch_size=7, details=details)
    assert (r["n"], r["accuracy"], r["balanced_accuracy"]) == (len(items), 1.0, 1.0)
    assert r["yes_rate"] == pytest.approx(frac_true) and set(r["by_kind"].values()) == {1.0}
    assert len(calls) == 1 and calls[0]["batch_size"] == 7
    assert len(calls[0]["images"]) == 4                       # one entry (one encoding) per image
    assert sum(len(q) for q in calls[0]["questions"]) == len(items)
    assert [d["answer"] == "yes" for d in details] == [i["truth"] for i in items]

    _stub_yes_no_probs(monkeypatch, lambda t: not t)
    r = ev.yes_no_accuracy(None, items)
    assert (r["accuracy"], r["balanced_accuracy"]) == (0.0, 0.0)
    assert r["yes_rate"] == pytest.approx(1 - frac_true)

    _stub_yes_no_probs(monkeypatch, lambda t: True)           # always yes
    r = ev.yes_no_accuracy(None, items)
    assert r["accuracy"] == pytest.approx(frac_true) and r["balanced_accuracy"] == 0.5
    assert (r["accuracy_true"], r["accuracy_false"], r["yes_rate"]) == (1.0, 0.0, 1.0)


def test_yes_no_summary_ties_and_kinds():
    items = [{"truth": True, "kind": "object"}, {"truth": False, "kind": "object"},
             {"truth": False, "kind": "color"}, {"truth": False, "kind": "color"}]
    r = ev.yes_no_summary(items, [True, True, False, True])
    assert r["accuracy"] == 0.5 and r["balanced_accuracy"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert r["by_kind"] == {"color": 0.5, "object": 0.5} and r["yes_rate"] == 0.75
    # only "object" has both truths: (1 + 0) / 2
    assert r["kind_balanced_accuracy"] == 0.5


def test_kind_balanced_accuracy_sees_through_a_question_form_prior():
    """An answerer that says yes to object questions and no to the others scores high plain
    accuracy on a set where object questions are mostly true and colour questions mostly
    false, and exactly 0.5 kind-balanced; a perfect answerer scores 1."""
    items = ([{"truth": True, "kind": "object"}] * 8 + [{"truth": False, "kind": "object"}] * 2
             + [{"truth": False, "kind": "color"}] * 8 + [{"truth": True, "kind": "color"}] * 2)
    prior = [it["kind"] == "object" for it in items]
    r = ev.yes_no_summary(items, prior)
    assert r["accuracy"] == 0.8 and r["kind_balanced_accuracy"] == 0.5
    assert ev.yes_no_summary(items, [it["truth"] for it in items])["kind_balanced_accuracy"] == 1.0


# --- mask IoU ------------------------------------------------------------------------------------

def test_attention_mask_iou_against_detected_regions():
    scene = gr.parse("a red circle to the left of two blue squares")
    lay = w.sample_layout(scene, random.Random(4))
    img = w.render(lay)
    true_groups = w.group_token_masks(lay).astype(np.float32)        # (2, 8, 8)
    soft = [m.reshape(-1) * 0.9 + 0.05 for m in true_groups]
    objs = gr.objects(scene)
    res = ev.attention_mask_iou(scene, img, soft, objs, 8)
    assert res["mask_iou"] == 1.0 and res["mask_note"] is None
    assert np.array_equal(np.array(res["detected_mask"], bool), true_groups.any(0))
    # one object's map missing: the mask is the other object's cells only
    part = ev.attention_mask_iou(scene, img, [soft[0], None], objs, 8)
    want = true_groups[0].sum() / true_groups.any(0).sum()
    assert part["mask_iou"] == pytest.approx(want) and part["mask_note"] == "missing_objects: squares"
    # shifted attention: partial overlap
    shifted = [np.roll(m.reshape(8, 8), 1, axis=1).reshape(-1) for m in soft]
    assert 0.0 < ev.attention_mask_iou(scene, img, shifted, objs, 8)["mask_iou"] < 1.0
    # a 16 x 16 grid is brought to 8 x 8 first
    big = [np.kron(m.reshape(8, 8), np.ones((2, 2))).reshape(-1) for m in soft]
    assert ev.attention_mask_iou(scene, img, big, objs, 16)["mask_iou"] == 1.0
    # nothing detected: an empty attention mask is not scored, a non-empty one scores 0
    blank = np.full((64, 64, 3), 255, np.uint8)
    flat = [np.zeros(64, np.float32), np.zeros(64, np.float32)]
    assert ev.attention_mask_iou(scene, blank, flat, objs, 8)["mask_iou"] is None
    assert ev.attention_mask_iou(scene, blank, soft, objs, 8)["mask_iou"] == 0.0
    assert ev.attention_mask_iou(None, img, soft, objs, 8)["mask_iou"] is None
    s = ev.summarize_masks([{"mask_iou": 1.0, "detected_mask": [[1]]}, {"mask_iou": 0.0, "detected_mask": [[0]]},
                            {"mask_iou": None, "detected_mask": [[0]]}])
    assert s == {"mean": 0.5, "n": 2, "skipped": 1, "mean_detected": 1.0, "n_detected": 1}


def test_masks_do_not_change_the_samples_and_clamp_layers(engine, tmp_path):
    prompts = _records(40)[1:2]      # "a triangle and a circle": two object words
    a = ev.sample_and_grade(engine, prompts, batch_size=4, image_dir=tmp_path / "a")
    b = ev.sample_and_grade(engine, prompts, batch_size=4, image_dir=tmp_path / "b", masks=True, skip_layers=10)
    for x, y in zip(a, b):
        assert (tmp_path / "a" / x["image"][len("images/"):]).read_bytes() == \
            (tmp_path / "b" / y["image"][len("images/"):]).read_bytes()
        assert "mask_iou" not in x
        assert y["mask_layers"] == [2, 3]                      # 6 layers, skip clamped to 2
        assert y["mask_note"] is None                          # every object word found in the prompt


def test_cli_reports_yes_no_and_mask_iou(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    gr.write_jsonl(prompts, _records(40)[:3])
    out = tmp_path / "eval"
    s = ev.main(["--checkpoint", tiny_model_dir, "--prompts", str(prompts), "--out", str(out),
                 "--batch-size", "8", "--limit", "3", "--yes-no", "6"])
    saved = json.loads((out / "summary.json").read_text())
    yn, mi = saved["yes_no"], saved["mask_iou"]
    assert yn["n"] == 6 and yn["n_true"] + yn["n_false"] == 6
    for k in ("accuracy", "balanced_accuracy", "yes_rate", *[f"by_kind.{k}" for k in yn["by_kind"]]):
        v = yn["by_kind"][k.split(".")[1]] if k.startswith("by_kind.") else yn[k]
        assert 0.0 <= v <= 1.0, k
    rows = [json.loads(line) for line in (out / "yes_no.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 3
    assert yn["accuracy"] == pytest.approx(np.mean([(r["answer"] == "yes") == r["truth"] for r in rows]))
    assert all((r["answer"] == "yes") == (r["p_yes"] > r["p_no"]) for r in rows)

    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert mi["n"] + mi["skipped"] == len(recs) == 3 and mi["layers"] == [1, 2, 3, 4]
    assert mi["n"] > 0 and 0.0 <= mi["mean"] <= 1.0
    for r in recs:
        assert r["mask_note"] is None and np.array(r["attention_mask"]).shape == (8, 8)
        det = ev.detected_token_mask(gr.parse(r["prompt"]), out / r["image"])
        assert np.array_equal(np.array(r["detected_mask"], bool), det)
        att = np.array(r["attention_mask"], bool)
        want = None if not (att.any() or det.any()) else ev.mask_iou(att, det)
        assert r["mask_iou"] == want
    text = ev.format_summary(s)
    assert "yes/no" in text and "mask IoU" in text

    off = ev.main(["--checkpoint", tiny_model_dir, "--prompts", str(prompts), "--out", str(tmp_path / "off"),
                   "--limit", "1", "--yes-no", "0", "--no-masks"])
    assert off["yes_no"] is None and off["mask_iou"] is None and "mask_iou" not in json.loads(
        (tmp_path / "off" / "results.jsonl").read_text().splitlines()[0])
    assert "yes/no" not in ev.format_summary(off)


def test_yes_no_on_vq_round_trips(engine, tiny_model_dir, tmp_path):
    from ospo.shapes import vq as vqm

    items = ev.yes_no_items(_records()[:3], per_record=3)
    trip = ev.vq_round_trip(engine, items)
    assert [(t["question"], t["truth"], t["id"]) for t in trip] == [(i["question"], i["truth"], i["id"]) for i in items]
    firsts = {}
    for it in items:
        firsts.setdefault(it["id"], it["image"])
    want, _ = vqm.reconstruct(engine.model.model.vqmodel, np.stack(list(firsts.values())))
    for t in trip:
        got = want[list(firsts).index(t["id"])]
        assert np.array_equal(t["image"], got)
    # a round trip is not the identity on a random VQ, and items of one image share one trip
    assert any(not np.array_equal(t["image"], i["image"]) for t, i in zip(trip, items))
    by_id = {}
    for t in trip:
        assert by_id.setdefault(t["id"], t["image"]) is t["image"]

    prompts = tmp_path / "p.jsonl"
    gr.write_jsonl(prompts, _records(40)[:2])
    s = ev.main(["--checkpoint", tiny_model_dir, "--prompts", str(prompts), "--out", str(tmp_path / "vq"),
                 "--limit", "2", "--yes-no", "4", "--yes-no-images", "vq", "--no-masks"])
    assert s["yes_no"]["images"] == "vq" and s["yes_no"]["n"] == 4
