"""ShapesWorld pretraining: the stage-job examples pass the real stage parsers, the recipe
runs at a tiny size and saves a checkpoint that ``from_pretrained`` loads, and the shipped
checkpoint was built by the recipe as it is now (a changed recipe without a rebuild fails)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from ospo import parsing, templates
from ospo.shapes import grammar as gr
from ospo.shapes import pretrain as pt
from ospo.shapes import tasks
from ospo.shapes.world import Group, Scene


def test_perturbations_do_what_each_operation_says():
    rng = random.Random(0)
    seen = Counter()
    for _ in range(400):
        _, s = tasks.sample_scene(rng)
        for op in templates.OPERATIONS:
            other = tasks.perturb_scene(s, op, rng)
            if other is None:
                continue
            seen[op] += 1
            assert not tasks.same_meaning(other, s)
            a, b = gr.describe(s), gr.describe(other)
            assert gr.parse(b) == other
            assert parsing.check_perturbation(a, b, op) is None, (op, a, b)
    assert min(seen.values()) > 200
    # a swap that only reorders a list is no change of meaning: never offered
    s = Scene((Group("circle", 1, "red"), Group("square", 1, "red")))
    assert tasks._candidates(s, "swap") == []
    assert tasks.same_meaning(s, Scene((s.groups[1], s.groups[0])))
    a, b = Group("circle", 1, "red"), Group("square", 1, "blue")
    assert tasks.same_meaning(Scene((a, b), "left of"), Scene((b, a), "right of"))
    assert not tasks.same_meaning(Scene((a, b), "left of"), Scene((b, a), "left of"))
    assert not tasks.same_meaning(Scene((a, b)), Scene((a, b), "above"))
    assert tasks.perturb_scene(Scene((Group("circle", 2),)), "drop", rng) is None


@pytest.mark.parametrize("task", tasks.TASKS)
def test_task_examples_pass_the_stage_parsers(task):
    rng = random.Random(1)
    held = gr.heldout_scenes()
    n = 0
    for _ in range(150):
        ex = tasks.example(task, rng, held)
        if ex is None:
            continue
        user, ans = ex
        n += 1
        prompt = user.rsplit("Prompt: ", 1)[-1]
        if task == "prompts":
            cands, reasons = parsing.parse_prompt_list(ans, max_objects=3)
            assert len(cands) == 3 and not reasons
            assert all(gr.parse(p) is not None and gr.parse(p) not in held for p, _ in cands)
        elif task == "objects":
            objs, why = parsing.parse_objects(ans, prompt, max_objects=3)
            assert why is None and objs == gr.objects(gr.parse(prompt))
        elif task == "perturb":
            op = next(k for k, v in templates.OPERATIONS.items() if user.startswith(v))
            p, why = parsing.parse_perturbation(ans, prompt, op)
            assert why is None and gr.parse(p) is not None
        elif task == "dense":
            a = user.split("\nA: ")[-1].split("\nB: ")[0]
            b = user.split("\nB: ")[-1]
            d, why = parsing.parse_dense(ans, a, b, gr.objects(gr.parse(a)))
            assert why is None and gr.parse(d[0]) == gr.parse(a) and gr.parse(d[1]) == gr.parse(b)
        else:
            qs, why = parsing.parse_questions(ans, min_questions=1, max_questions=10)
            assert why is None and qs == [q["question"] for q in gr.questions(gr.parse(prompt))]
    assert n > 100


def test_yes_no_labels_come_from_the_evaluator():
    from ospo.shapes import world as w
    from ospo.shapes.evaluate import check, detect

    rng = random.Random(2)
    labels = []
    for i in range(60):
        _, s = tasks.sample_scene(rng)
        img = w.render(w.sample_layout(s, rng))
        dets = detect(img)
        q, t, _ = pt.yes_no_question(rng, s, dets, i % 2 == 0)
        labels.append(t)
        # the label is the truth of that question on this image
        truths = {}
        for cand in [s] + [tasks.perturb_scene(s, op, random.Random(k)) for k, op in enumerate(templates.OPERATIONS)]:
            if cand is None:
                continue
            for qq, tt in zip(gr.questions(cand), gr.answers(cand, check(cand, dets)["requirements"])):
                truths.setdefault(qq["question"], tt)
        if q in truths:
            assert truths[q] == t
    assert 0.35 < sum(labels) / len(labels) < 0.65   # balanced as asked (want alternates)
    # own-scene questions on a true render are all true
    s = Scene((Group("circle", 2, "red"), Group("square", 1, "blue")))
    img = w.render(w.sample_layout(s, rng))
    assert all(gr.answers(s, check(s, detect(img))["requirements"]))


def test_yes_no_training_questions_are_balanced_within_each_kind():
    """The question's form must not tell the answer: per kind, about as many true as false
    (drawn by truth alone, object questions were 84% true and colour questions 59% false)."""
    from collections import defaultdict

    from ospo.shapes import world as w
    from ospo.shapes.evaluate import detect

    rng = random.Random(5)
    by_kind = defaultdict(list)
    for i in range(300):
        _, s = tasks.sample_scene(rng)
        img = w.render(w.sample_layout(s, rng))
        q, t, kind = pt.yes_no_question(rng, s, detect(img), i % 2 == 0)
        by_kind[kind].append(t)
    assert set(by_kind) >= {"object", "color", "count", "relation"}
    for kind, ts in by_kind.items():
        assert 0.3 < sum(ts) / len(ts) < 0.7, (kind, sum(ts), len(ts))


def test_curriculum_grows_one_shape_per_stage_then_asks_everything():
    r = pt.Recipe(yn_stage_steps=10)
    assert [pt.curriculum_shapes(s, r) for s in (0, 9, 10, 19, 20, 29)] == [
        ("circle",), ("circle",), ("circle", "square"), ("circle", "square"),
        ("circle", "square", "triangle"), ("circle", "square", "triangle")]
    assert pt.curriculum_shapes(30, r) is None and pt.curriculum_shapes(10_000, r) is None


def test_presence_questions_are_true_exactly_when_the_image_holds_the_shape():
    from ospo.shapes import world as w
    from ospo.shapes.evaluate import detect

    rng = random.Random(3)
    s = Scene((Group("circle", 2, "red"), Group("square", 1, "blue")))
    dets = detect(w.render(w.sample_layout(s, rng)))
    for _ in range(20):
        assert pt.presence_question(rng, dets, w.SHAPES, True) in ("Is there a circle?", "Is there a square?")
        assert pt.presence_question(rng, dets, w.SHAPES, False) == "Is there a triangle?"
    assert pt.presence_question(rng, dets, ("circle",), False) is None   # nothing fits: the caller redraws
    assert pt.presence_question(rng, dets, ("circle", "triangle"), True) == "Is there a circle?"


# a recipe small enough to build in seconds (each test sets its evaluation and phase-2 length)
TINY_RECIPE = dict(steps=3, hidden=32, layers=2, heads=2, kv_heads=1, vq_steps=2, gen_rows=4, yes_no_rows=4,
                   caption_rows=2, text_rows=4, gen_pool=12, und_pool=8, yn_stage_steps=1, yn_rows=4)


def test_recipe_runs_tiny_and_saves_a_loadable_checkpoint(tmp_path):
    from transformers import JanusForConditionalGeneration

    from ospo.engine import Engine

    small = dict(TINY_RECIPE, eval_yes_no=6, eval_text=3, eval_every=2, yn_full_steps=1, yn_text_every=3)
    out = tmp_path / "ck"
    res = pt.build(out, pt.Recipe(**small), vq_cache=tmp_path / "vqc", progress=False, threads=1)
    assert res["recipe_hash"] == pt.recipe_hash(pt.Recipe(**small))
    hist = res["lm_history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    # generation and text rows join every step (gen_every = text_every = 1), understanding
    # rows every und_every-th (default 2: steps 1 and 3)
    assert [("gen" in h, "text" in h, "yes_no" in h) for h in hist] == [(True, True, True), (True, True, False),
                                                                       (True, True, True)]
    assert hist[0]["gen"] > 0 and hist[0]["text"] > 0 and hist[0]["yes_no"] > 0
    assert "yes_no_acc" in hist[1] and "yes_no_acc" in hist[2]
    # phase 2, the yes/no curriculum: one shape more per stage, then the full mix; generation
    # rows every yn_gen_every-th step (default 2), text rows every yn_text_every-th (3 here)
    yh = res["yes_no_history"]
    assert [h["shapes"] for h in yh] == [1, 2, 3, "all"]
    assert [("gen" in h, "text" in h) for h in yh] == [(True, True), (False, False), (True, False), (False, True)]
    assert all(h["yes_no"] > 0 for h in yh) and "yes_no_acc" in yh[1] and "yes_no_acc" in yh[3]
    assert 0.0 <= res["eval"]["yes_no"]["accuracy"] <= 1.0 and res["eval"]["yes_no"]["n"] == 6
    assert json.loads((out / "recipe.json").read_text())["recipe_hash"] == res["recipe_hash"]
    m = JanusForConditionalGeneration.from_pretrained(out)
    assert m.config.text_config.num_hidden_layers == 2
    eng = Engine.load(path=str(out))
    assert eng.grid == 8 and eng.tokenizer.convert_tokens_to_ids("<begin_of_image>") == eng.ids.boi
    # the VQ was cached: a second build with another LM setting reuses it
    assert len(list((tmp_path / "vqc").iterdir())) == 1
    res2 = pt.build(tmp_path / "ck2", pt.Recipe(**dict(small, steps=1, eval_every=0)), vq_cache=tmp_path / "vqc",
                    progress=False, evaluate=False, threads=1)
    assert res2["vq_hash"] == res["vq_hash"] and res2["recipe_hash"] != res["recipe_hash"]
    assert len(list((tmp_path / "vqc").iterdir())) == 1


def test_generation_inputs_start_at_the_text_embeddings_scale():
    """Default init leaves visual-token input embeddings ~100x smaller than text ones; the
    recipe's init brings them to the text embeddings' mean norm, and gradients still flow."""
    import torch
    from transformers import JanusForConditionalGeneration

    from ospo.tiny import build_tokenizer

    tok = build_tokenizer()
    r = pt.Recipe(hidden=32, layers=2, heads=2, kv_heads=1)
    torch.manual_seed(0)
    m = JanusForConditionalGeneration(pt.model_config(r, tok))
    codes = torch.arange(m.model.generation_embeddings.num_embeddings)[None]
    text = m.get_input_embeddings().weight.norm(dim=-1).mean().item()
    before = m.prepare_embeddings_for_image_generation(codes).norm(dim=-1).mean().item()
    assert before < text / 10
    assert pt.init_generation_inputs(m) == pytest.approx(text)
    after = m.prepare_embeddings_for_image_generation(codes)
    assert after.norm(dim=-1).mean().item() == pytest.approx(text, rel=1e-4)
    after.sum().backward()
    assert m.model.generation_embeddings.weight.grad.abs().sum() > 0


def test_bad_recipe_setting_is_named():
    with pytest.raises(SystemExit, match="hiden"):
        pt._parse_set(["hiden=3"])
    with pytest.raises(SystemExit, match="steps takes a int"):
        pt._parse_set(["steps=many"])
    # --set given twice keeps both (it once kept only the last)
    a = pt._parser().parse_args(["--set", "steps=5", "--set", "hidden=16", "layers=2"])
    assert a.set == ["steps=5", "hidden=16", "layers=2"]


def test_shipped_checkpoint_was_built_by_this_recipe():
    """Fails when the recipe (settings or the code that makes its data and model) changed
    without a rebuild: run `python -m ospo.shapes.pretrain` and commit the checkpoint."""
    ck = pt.packaged_checkpoint()
    meta = json.loads((ck / "recipe.json").read_text())
    assert meta["recipe"] == pt.dataclasses.asdict(pt.Recipe()), "Recipe defaults changed: rebuild the checkpoint"
    assert meta["recipe_hash"] == pt.recipe_hash(pt.Recipe()), "recipe code changed: rebuild the checkpoint"
    assert (ck / "model.safetensors").stat().st_size < 20 * 2**20


def test_phase1_snapshot_resumes_to_the_weights_of_a_continuous_run(tmp_path):
    """--phase1 DIR: the first build writes phase 1's model and data stream, a second one
    resumes there (skipping phase 1) and ends with the weights the continuous run ended
    with; another phase-2 setting resumes too, another phase-1 setting is refused."""
    from safetensors.torch import load_file

    small = dict(TINY_RECIPE, eval_yes_no=4, eval_text=2, eval_every=0, yn_full_steps=2)
    snap = tmp_path / "p1"
    kw = dict(vq_cache=tmp_path / "vqc", progress=False, evaluate=False, threads=1, phase1=snap)
    first = pt.build(tmp_path / "a", pt.Recipe(**small), **kw)
    assert (snap / "phase1.pt").exists() and first["phase1"]["resumed"] is False
    again = pt.build(tmp_path / "b", pt.Recipe(**small), **kw)
    assert again["phase1"]["resumed"] is True and again["recipe_hash"] == first["recipe_hash"]
    assert again["seconds"]["yes_no_curriculum"] > 0   # timed from its own start, not from phase 1's record
    assert again["lm_history"] == first["lm_history"]   # phase 1's record, carried by the snapshot

    def untimed(history):   # the wall clock differs between two runs; every loss and rate must not
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert untimed(again["yes_no_history"]) == untimed(first["yes_no_history"])
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
    other = pt.build(tmp_path / "c", pt.Recipe(**dict(small, yn_lr=1e-3)), **kw)
    assert other["phase1"]["resumed"] is True and other["lm_history"] == first["lm_history"]
    assert untimed(other["yes_no_history"]) != untimed(first["yes_no_history"])
    with pytest.raises(SystemExit, match="another recipe"):
        pt.build(tmp_path / "d", pt.Recipe(**dict(small, steps=2)), **kw)
    assert not (tmp_path / "d").exists()
