"""Stage 3 end to end on the tiny Janus: supplied prompts and variants through stages 1-2 (no
model call), then images (every record field, PNG files, masks recomputable from the record),
resume after a kill re-samples nothing finished, the teacher-forced mask source, then stage 4
reads the output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ospo import config, masks
from ospo.rundir import RunDir, derive_seed, read_jsonl
from ospo.stages import images, perturb, prompts, vqa

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"

PROMPTS = [
    {"id": "a-0", "category": "attribute", "sub_category": "color", "prompt": "a red apple and a green cup",
     "objects": ["apple", "cup"]},
    {"id": "b-0", "category": "layout", "sub_category": "spatial_2d", "prompt": "a dog to the left of a bench",
     "objects": ["dog", "bench"]},
    {"id": "c-0", "category": "layout", "sub_category": "numeracy", "prompt": "three apples on a plate",
     "objects": ["apples", "plate"]},
]
VARIANTS = [
    {"id": "a-0", "variants": [
        {"k": 0, "op": "replace", "perturbed": "a red apple and a blue cup",
         "dense": "a red apple and a green cup on a wooden table",
         "perturbed_dense": "a red apple and a blue cup on a wooden table"},
        {"k": 1, "op": "replace", "perturbed": "a red apple and a green cup",  # same as x: rejected slot
         "dense": "x", "perturbed_dense": "y"}]},
    {"id": "b-0", "variants": [
        {"k": 0, "op": "swap", "perturbed": "a bench to the left of a dog",
         "dense": "a Dog to the left of a bench in a sunny park, the dog sleeps",
         "perturbed_dense": "a bench to the left of a dog in a sunny park, the dog sleeps"},
        {"k": 1, "op": "replace", "perturbed": "a cat to the left of a bench",
         "dense": "a dog to the left of a bench at night",
         "perturbed_dense": "a cat to the left of a bench at night"}]},  # pert side: "dog" missing
    {"id": "c-0", "variants": [
        {"k": 0, "op": "replace", "perturbed": "two apples on a plate",
         "dense": "three apples on a plate on a kitchen counter",
         "perturbed_dense": "two apples on a plate on a kitchen counter"},
        {"k": 1, "op": "replace", "perturbed": "three apples on a plate", "dense": "x", "perturbed_dense": "y"}]},
]
QUESTIONS = {p["id"]: ["Is there a " + p["objects"][0] + "?", "Is there a " + p["objects"][1] + "?"] for p in PROMPTS}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write(path: Path, recs) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _cfg(tmp_path, tiny_model_dir, *overrides):
    p = _write(tmp_path / "prompts_in.jsonl", PROMPTS)
    v = _write(tmp_path / "variants_in.jsonl", VARIANTS)
    q = _write(tmp_path / "questions_in.jsonl", [{"id": i, "questions": qs} for i, qs in QUESTIONS.items()])
    return config.load(TINY, [f"model.path={tiny_model_dir}", f"prompts.input={p}", f"perturb.input={v}",
                              f"vqa.input={q}", "images.batch_size=4", *overrides])


def _no_model():
    raise AssertionError("the model was loaded")


def _stages12(cfg, rd):
    prompts.run(cfg, rd, 0, _no_model)
    perturb.run(cfg, rd, 0, _no_model)


def test_images_end_to_end_resume_and_vqa(tmp_path, tiny_model_dir, engine, monkeypatch):
    cfg = _cfg(tmp_path, tiny_model_dir)
    wd = tmp_path / "run"
    rd = RunDir(wd)
    _stages12(cfg, rd)
    it = wd / "iter_00"
    assert [sum("rejected" not in s for s in r["variants"]) for r in read_jsonl(it / "variants.jsonl")] == [1, 2, 1]

    # batch_size 4, 2 slots per prompt -> one prompt per batch; killed on the second batch
    real = images.sampling.sample_images
    calls = []

    def dying(eng, ids, seeds, **kw):
        calls.append(len(ids))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(eng, ids, seeds, **kw)

    monkeypatch.setattr(images.sampling, "sample_images", dying)
    with pytest.raises(KeyboardInterrupt):
        images.run(cfg, rd, 0, lambda: engine)
    assert [r["id"] for r in read_jsonl(it / "images.jsonl")] == ["a-0", "a-0"]
    with open(it / "images.jsonl", "a") as fh:
        fh.write('{"id": "b-0", "k": 0, "si')  # a half line from the killed writer
    calls.clear()
    monkeypatch.setattr(images.sampling, "sample_images",
                        lambda eng, ids, seeds, **kw: calls.append(len(ids)) or real(eng, ids, seeds, **kw))
    m = images.run(cfg, rd, 0, lambda: engine)
    assert calls == [4, 2]  # b-0 (2 slots x 2 sides), c-0 (1 slot); a-0 not re-sampled
    recs = read_jsonl(it / "images.jsonl")
    keys = [(r["id"], r["k"], r["side"]) for r in recs]
    assert keys == [("a-0", 0, "orig"), ("a-0", 0, "pert"), ("b-0", 0, "orig"), ("b-0", 0, "pert"),
                    ("b-0", 1, "orig"), ("b-0", 1, "pert"), ("c-0", 0, "orig"), ("c-0", 0, "pert")]
    assert [e["id"] for e in read_jsonl(it / "images.done")] == ["a-0", "b-0", "c-0"]

    grid = engine.grid
    side_px = engine.model.config.vision_config.image_size
    by = {(r["id"], r["k"], r["side"]): r for r in recs}
    fields = {"id", "category", "sub_category", "k", "side", "seed", "prompt", "prompt_fed", "image", "input_ids",
              "tokens", "object_spans", "objects", "objects_missing", "layers", "grid", "mask_source", "soft_maps",
              "mask", "mask_note"}
    for r in recs:
        assert fields <= set(r)
        assert r["seed"] == derive_seed(cfg.run.seed, "images", r["id"], r["k"], r["side"])
        assert r["image"].startswith("iter_00/images/") and r["image"].endswith(".png")
        with Image.open(wd / r["image"]) as im:
            assert im.size == (side_px, side_px)
        assert len(r["tokens"]) == grid * grid and r["grid"] == grid
        assert r["layers"] == [1, 2, 3, 4] and r["mask_source"] == "sampling"  # tiny.yaml: skip_layers 1 of 6
        assert r["input_ids"] == engine.image_prompt_ids([r["prompt_fed"]])[0]
        assert r["input_ids"][-1] == engine.ids.boi
        assert np.array(r["mask"]).shape == (grid, grid) and set(np.unique(r["mask"])) <= {0, 1}
        # the mask is recomputable from the record alone
        z = np.load(wd / r["soft_maps"])
        assert z["maps"].shape == (len(r["objects"]), grid, grid) and list(z["objects"]) == r["objects"]
        soft = [m if f else None for m, f in zip(z["maps"], z["found"])]
        want, note, missing = masks.image_mask(soft, r["objects"], grid)
        assert want.tolist() == r["mask"] and note == r["mask_note"] and missing == r["objects_missing"]
        assert r["object_spans"] == masks.find_object_spans(r["input_ids"], r["objects"], engine.tokenizer)
    # every occurrence, case-insensitive: "Dog" and "dog" in b-0 k0 orig
    assert len(by[("b-0", 0, "orig")]["object_spans"][0]) == 2
    assert by[("b-0", 1, "pert")]["objects_missing"] == ["dog"]
    assert by[("b-0", 1, "pert")]["mask_note"] == "missing_objects: dog"
    assert by[("a-0", 0, "orig")]["prompt"] == "a red apple and a green cup"
    # the exact sampled tokens: the same as sampling that image alone with its seed
    r = by[("c-0", 0, "pert")]
    alone = real(engine, [r["input_ids"]], [r["seed"]], guidance_scale=cfg.images.guidance_scale)[0]
    assert alone.tokens == r["tokens"]

    assert m["counts"] == {"in": 3, "out": 3, "rejected": 0}
    ex = m["extra"]
    assert ex["images"] == 8 and ex["objects_missing"] == {"dog": 1} and ex["images_no_object"] == 0
    assert ex["seconds_per_image"] > 0 and ex["layers"] == [1, 2, 3, 4]
    assert ex["empty_masks"] == sum(1 for r in recs if not np.any(r["mask"]))

    # a rerun is a no-op; stage 4 reads the output
    images.run(cfg, rd, 0, _no_model)
    vm = vqa.run(cfg, rd, 0, lambda: engine)
    assert vm["counts"]["in"] == 3
    for p in read_jsonl(it / "pairs.jsonl"):
        chosen = by[(p["id"], p["k"], "orig")]
        assert p["chosen"]["tokens"] == chosen["tokens"] and p["chosen"]["mask"] == chosen["mask"]


def test_teacher_forced_source_and_capture_off(tmp_path, tiny_model_dir, engine):
    cfg = _cfg(tmp_path, tiny_model_dir, "images.mask_source=teacher_forced")
    rd = RunDir(tmp_path / "tf")
    _stages12(cfg, rd)
    images.run(cfg, rd, 0, lambda: engine, limit=1)
    recs = read_jsonl(tmp_path / "tf" / "iter_00" / "images.jsonl")
    x_ids = engine.image_prompt_ids([PROMPTS[0]["prompt"]])[0]
    assert len(recs) == 2 and all(r["input_ids"] == x_ids and r["mask_source"] == "teacher_forced" for r in recs)
    spans_x = masks.find_object_spans(x_ids, PROMPTS[0]["objects"], engine.tokenizer)
    assert all(spans_x) and all(r["object_spans"] == spans_x for r in recs)
    assert recs[0]["prompt_fed"] != recs[0]["prompt"]

    cfg_off = _cfg(tmp_path, tiny_model_dir, "images.capture_masks=false")
    rd2 = RunDir(tmp_path / "off")
    _stages12(cfg_off, rd2)
    images.run(cfg_off, rd2, 0, lambda: engine, limit=1)
    off = read_jsonl(tmp_path / "off" / "iter_00" / "images.jsonl")
    assert [r["tokens"] for r in off] == [r["tokens"] for r in recs]  # same seeds, same images
    assert all(r["mask"] is None and r["mask_note"] == "capture_off" for r in off)
