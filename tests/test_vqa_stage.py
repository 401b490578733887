"""Stage 4 end to end: fabricated images.jsonl (PNG files, random tokens and masks),
supplied questions scored by the tiny random Janus, the rules checked against what was
recorded, scripted scores for the exact selection, resume, and the decomposition reject
path on random weights."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ospo import config, understanding
from ospo.rundir import RunDir, StageError, derive_seed, read_jsonl
from ospo.selection import ALL_TRUE, MIN_CHOSEN
from ospo.stages import vqa

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
GRID = 8


def tiny_cfg(*overrides):
    return config.load(TINY, list(overrides))


def _image_record(wd: Path, pid: str, sub: str, prompt: str, k: int, side: str, color=None) -> dict:
    rng = np.random.RandomState(abs(hash((pid, k, side))) % (2 ** 31))
    rel = f"images/{pid}_{k}_{side}.png"
    (wd / "iter_00" / "images").mkdir(parents=True, exist_ok=True)
    if color is None:
        pix = rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)
    else:
        pix = np.zeros((64, 64, 3), dtype=np.uint8) + np.array(color, dtype=np.uint8)
    Image.fromarray(pix).save(wd / "iter_00" / rel)
    np.savez(wd / "iter_00" / f"images/{pid}_{k}_{side}.npz", maps=rng.rand(1, GRID, GRID))
    fed = f"{prompt} in a park" if side == "orig" else f"{prompt} without something in a park"
    return {
        "id": pid, "category": "attribute", "sub_category": sub, "k": k, "side": side,
        "seed": int(rng.randint(1 << 30)), "prompt": prompt, "prompt_fed": fed,
        "image": f"iter_00/{rel}",  # relative to the work directory
        "tokens": rng.randint(0, 256, GRID * GRID).tolist(),
        "mask": rng.randint(0, 2, (GRID, GRID)).tolist(),
        "soft_maps": f"iter_00/images/{pid}_{k}_{side}.npz",
        "object_spans": [[[2, 3]]], "layers": [1, 2, 3, 4], "grid": GRID,
    }


PROMPTS = {
    "p0": "a red cube and a blue ball",
    "p1": "a dog to the left of a bench",
    "p2": "three green apples",
    "p3": "a wooden chair and a metal bucket",
}
QUESTIONS = {
    "p0": ["Is there a red cube?", "Is there a blue ball?", "Is the cube red?"],
    "p1": ["Is there a dog?", "Is the dog to the left of the bench?"],
    "p2": ["Are there apples?", "Are there three apples?"],
    "p3": ["Is there a wooden chair?", "Is there a metal bucket?"],
}


def _seed(wd: Path, *, n_pairs=2, extra=()) -> list[dict]:
    recs = []
    for pid, prompt in PROMPTS.items():
        for k in range(n_pairs):
            for side in ("orig", "pert"):
                recs.append(_image_record(wd, pid, "color", prompt, k, side))
    recs += list(extra)
    (wd / "iter_00" / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def _questions_file(path: Path, table=QUESTIONS) -> Path:
    path.write_text("".join(json.dumps({"id": i, "questions": q}) + "\n" for i, q in table.items()))
    return path


def _no_model():
    raise AssertionError("the model was loaded")


def _check_rules(rec: dict, tau: float) -> None:
    """Every kept pair satisfies both rules given its recorded scores, every filtered one
    violates the rules it names (and only those), and best = max S_chosen among survivors."""
    imgs = {(i["k"], i["side"]): i for i in rec["images"]}
    for i in rec["images"]:
        assert i["s"] == pytest.approx([a - b for a, b in zip(i["p_yes"], i["p_no"])])
        assert i["S"] == pytest.approx(sum(i["s"]) / len(i["s"]))
        assert len(i["s"]) == len(rec["questions"])
    survivors = []
    for p in rec["pairs"]:
        S_w, s_l = imgs[(p["k"], "orig")]["S"], imgs[(p["k"], "pert")]["s"]
        assert p["S_chosen"] == S_w and p["S_rejected"] == imgs[(p["k"], "pert")]["S"]
        fails = ([MIN_CHOSEN] if S_w < tau else []) + ([ALL_TRUE] if all(s > 0 for s in s_l) else [])
        assert p["rules"] == fails
        if fails:
            assert p["status"] == "filtered"
        else:
            assert p["status"] in ("kept", "not_selected")
            survivors.append(p)
    if survivors:
        best = max(survivors, key=lambda p: (p["S_chosen"], -p["k"]))
        assert rec["kept"] == [best["k"]] and "rejected" not in rec
    else:
        assert rec["kept"] == [] and rec["rejected"] == "no_pair_survived"


def test_end_to_end_supplied_questions_and_noop_rerun(tmp_path, engine):
    wd = tmp_path / "run"
    images = _seed(wd, extra=[_image_record(wd, "p4", "color", "a lone cat", 0, "orig")])
    bad = dict(QUESTIONS, p3=["Is there a wooden chair", "Is there a metal bucket?"])  # no '?': user reject
    qfile = _questions_file(tmp_path / "q.jsonl", bad)
    cfg = tiny_cfg(f"vqa.input={qfile}", "vqa.batch_size=5")
    calls = []
    m = vqa.run(cfg, RunDir(wd), 0, lambda: calls.append(1) or engine)
    it = wd / "iter_00"
    recs = read_jsonl(it / "vqa.jsonl")
    assert [r["id"] for r in recs] == ["p0", "p1", "p2", "p3", "p4"]
    by = {r["id"]: r for r in recs}
    # p3: supplied question without '?'; p4: only an 'orig' image, no complete pair
    assert by["p3"]["rejected"] == "user_not_a_question" and by["p3"]["questions"] is None
    assert by["p4"]["rejected"] == "no_complete_pair" and by["p4"]["incomplete"] == [0]
    # tau = -1 in configs/tiny.yaml: rule 1 never fires; only rule 2 can remove a pair
    for pid in ("p0", "p1", "p2"):
        r = by[pid]
        assert r["questions"] == QUESTIONS[pid] and r["question_source"] == "user"
        assert r["prompt"] == PROMPTS[pid] and r["category"] == "attribute" and r["sub_category"] == "color"
        assert sorted((i["k"], i["side"]) for i in r["images"]) == [(0, "orig"), (0, "pert"), (1, "orig"), (1, "pert")]
        _check_rules(r, tau=-1.0)
        # the recorded numbers are the model's for that image and question (plain path)
        img = r["images"][3]
        ref = understanding.yes_no_probs_reference(engine, wd / img["image"], r["questions"][-1])
        assert (img["p_yes"][-1], img["p_no"][-1]) == pytest.approx(ref, rel=1e-4, abs=1e-7)
    pairs = read_jsonl(it / "pairs.jsonl")
    kept = {(r["id"], k) for r in recs for k in r.get("kept", [])}
    assert {(p["id"], p["k"]) for p in pairs} == kept
    src = {(r["id"], r["k"], r["side"]): r for r in images}
    for p in pairs:
        assert p["prompt"] == PROMPTS[p["id"]]  # the ORIGINAL x, not the dense prompt fed to sampling
        for side, key in (("orig", "chosen"), ("pert", "rejected")):
            want = src[(p["id"], p["k"], side)]
            assert p[key] == {f: want[f] for f in ("image", "tokens", "mask", "soft_maps", "seed", "prompt_fed")}
        assert p["S_chosen"] == next(x["S"] for x in by[p["id"]]["images"] if (x["k"], x["side"]) == (p["k"], "orig"))
    # manifest: counts from the ledger, extras consistent with the records
    assert m["counts"]["in"] == 5 and m["counts"]["out"] == len({i for i, _ in kept})
    assert m["counts"]["out"] + m["counts"]["rejected"] == 5
    assert m["rejects"].get("user_not_a_question") == 1 and m["rejects"].get("no_complete_pair") == 1
    ex = m["extra"]
    all_pairs = [p for r in recs for p in r.get("pairs", [])]
    assert ex["pairs_scored"] == 6 and ex["pairs_kept"] == len(pairs)
    assert ex["pairs_removed_by_rule"][MIN_CHOSEN] == 0
    assert ex["pairs_removed_by_rule"][ALL_TRUE] == sum(ALL_TRUE in p["rules"] for p in all_pairs)
    assert ex["prompts_survived"] == m["counts"]["out"]
    assert ex["questions_per_prompt"] == pytest.approx((3 + 2 + 2) / 3)
    assert ex["mean_S_chosen"] == pytest.approx(statistics.mean(p["S_chosen"] for p in all_pairs), abs=1e-6)
    assert ex["scoring"]["rows"] == 4 * (3 + 2 + 2) and ex["scoring"]["images"] == 12
    assert ex["questions_per_s"] > 0
    assert ex["question_source"] == {"user": 4}  # p4 was rejected before any question was asked
    assert by["p4"]["question_source"] is None
    assert calls  # the model scored the images
    # the rerun is a no-op: no model, identical files
    before = {f: (it / f).read_text() for f in ("vqa.jsonl", "pairs.jsonl", "vqa.done")}
    m2 = vqa.run(cfg, RunDir(wd), 0, _no_model)
    assert before == {f: (it / f).read_text() for f in before}
    assert m2["counts"] == m["counts"] and m2["extra"]["pairs_removed_by_rule"] == ex["pairs_removed_by_rule"]


def test_min_chosen_rule_on_model_scores(tmp_path, engine):
    """tau at the median of the recorded S(y_w) of a tau = -1 run: the pairs below it are now
    removed by rule 1, the rest are judged as before; every record obeys the rules."""
    qfile = _questions_file(tmp_path / "q.jsonl")
    first = tmp_path / "a"
    _seed(first)
    vqa.run(tiny_cfg(f"vqa.input={qfile}"), RunDir(first), 0, lambda: engine)
    S_w = sorted(p["S_chosen"] for r in read_jsonl(first / "iter_00" / "vqa.jsonl") for p in r["pairs"])
    tau = S_w[len(S_w) // 2]  # the pairs strictly below it: len // 2 of them (distinct random scores)
    second = tmp_path / "b"
    _seed(second)
    try:
        m = vqa.run(tiny_cfg(f"vqa.input={qfile}", f"vqa.tau={tau}"), RunDir(second), 0, lambda: engine)
    except StageError:  # every prompt may lose its pairs; the manifest is written first
        m = json.loads((second / "iter_00" / "vqa.manifest.json").read_text())
    recs = read_jsonl(second / "iter_00" / "vqa.jsonl")
    for r in recs:
        _check_rules(r, tau=tau)
    assert m["extra"]["pairs_removed_by_rule"][MIN_CHOSEN] == sum(s < tau for s in S_w) == len(S_w) // 2 > 0
    assert m["extra"]["prompts_survived"] == sum(1 for r in recs if r["kept"])


# --- scripted scores: exact selection through the stage --------------------------------------

# image colour -> (p_yes, p_no) per question (2 questions); s = p_yes - p_no
SCRIPT = {
    # a: k0 S_w 0.5 >= 0.4, s_l [0.25, -0.25]         -> survives
    #    k1 S_w 0.75,       s_l [0.25, 0.5] all > 0     -> rule 2
    #    k2 S_w 0.25 < 0.4, s_l [-0.5, -0.5]           -> rule 1
    ("a", 0, "orig"): ([0.75, 0.75], [0.25, 0.25]), ("a", 0, "pert"): ([0.5, 0.25], [0.25, 0.5]),
    ("a", 1, "orig"): ([0.875, 0.875], [0.125, 0.125]), ("a", 1, "pert"): ([0.5, 0.75], [0.25, 0.25]),
    ("a", 2, "orig"): ([0.5, 0.5], [0.25, 0.25]), ("a", 2, "pert"): ([0.25, 0.25], [0.75, 0.75]),
    # b: k0 S_w 0.25 < 0.4 and s_l [0.5, 0.5] all > 0   -> both rules
    #    k1 S_w 0.0 < 0.4                               -> rule 1   => no survivor
    #    k2 S_w 0.5, s_l [0.5, 0.25]                    -> rule 2
    ("b", 0, "orig"): ([0.5, 0.5], [0.25, 0.25]), ("b", 0, "pert"): ([0.75, 0.75], [0.25, 0.25]),
    ("b", 1, "orig"): ([0.5, 0.5], [0.5, 0.5]), ("b", 1, "pert"): ([0.25, 0.25], [0.5, 0.5]),
    ("b", 2, "orig"): ([0.75, 0.75], [0.25, 0.25]), ("b", 2, "pert"): ([0.75, 0.5], [0.25, 0.25]),
    # c: k0, k1, k2 all S_w 0.5, s_l [-0.5, 0.5] -> all survive, tie -> k0
    **{("c", k, s): (([0.75, 0.75], [0.25, 0.25]) if s == "orig" else ([0.25, 0.75], [0.75, 0.25]))
       for k in range(3) for s in ("orig", "pert")},
}
COLORS = {key: (10 * i, 255 - 10 * i, 7) for i, key in enumerate(SCRIPT)}
BY_COLOR = {c: key for key, c in COLORS.items()}


def _scripted_scores(eng, images, questions, *, batch_size=32, encode="once"):
    out = []
    for im, qs in zip(images, questions):
        py, pn = SCRIPT[BY_COLOR[tuple(int(v) for v in im.getpixel((0, 0)))]]
        assert len(qs) == 2
        out.append(understanding.ImageScore(list(py), list(pn)))
    return out


def _seed_scripted(wd: Path, order=("a", "b", "c")):
    recs = [_image_record(wd, pid, "color", f"prompt {pid}", k, side, color=COLORS[(pid, k, side)])
            for pid in order for k in range(3) for side in ("orig", "pert")]
    (wd / "iter_00" / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _scripted_run(tmp_path, monkeypatch, name, *overrides):
    monkeypatch.setattr(vqa.understanding, "yes_no_probs", _scripted_scores)
    wd = tmp_path / name
    _seed_scripted(wd)
    q = _questions_file(tmp_path / "q.jsonl", {i: ["Is there a cube?", "Is it red?"] for i in "abc"})
    try:
        m = vqa.run(tiny_cfg(f"vqa.input={q}", "vqa.tau=0.4", *overrides), RunDir(wd), 0, lambda: object())
    except StageError:
        m = json.loads((wd / "iter_00" / "vqa.manifest.json").read_text())
    recs = {r["id"]: r for r in read_jsonl(wd / "iter_00" / "vqa.jsonl")}
    return m, recs, read_jsonl(wd / "iter_00" / "pairs.jsonl")


def test_scripted_selection_best(tmp_path, monkeypatch):
    """tau 0.4 (see SCRIPT): a keeps k0; b has no survivor (rejected no_pair_survived);
    c ties at S_w 0.5 -> k0. Removed: rule 1: a.k2, b.k0, b.k1 = 3; rule 2: a.k1, b.k0,
    b.k2 = 3; both: b.k0 = 1 -> 5 distinct pairs removed of 9."""
    m, recs, pairs = _scripted_run(tmp_path, monkeypatch, "best")
    assert recs["a"]["kept"] == [0] and recs["c"]["kept"] == [0]
    assert recs["b"]["kept"] == [] and recs["b"]["rejected"] == "no_pair_survived" and recs["b"]["images"]
    assert [p["rules"] for p in recs["a"]["pairs"]] == [[], [ALL_TRUE], [MIN_CHOSEN]]
    assert [p["rules"] for p in recs["b"]["pairs"]] == [[MIN_CHOSEN, ALL_TRUE], [MIN_CHOSEN], [ALL_TRUE]]
    assert [p["status"] for p in recs["c"]["pairs"]] == ["kept", "not_selected", "not_selected"]
    assert [(p["id"], p["k"]) for p in pairs] == [("a", 0), ("c", 0)]
    assert pairs[0]["S_chosen"] == 0.5 and pairs[0]["S_rejected"] == 0.0
    ex = m["extra"]
    assert ex["pairs_removed_by_rule"] == {MIN_CHOSEN: 3, ALL_TRUE: 3, "both": 1}
    assert ex["prompts_survived"] == 2 == m["counts"]["out"] and m["rejects"] == {"no_pair_survived": 1}
    assert ex["pairs_not_selected"] == 2 and ex["pairs_kept"] == 2
    # mean S_w over the 9 pairs: (0.5 + 0.75 + 0.25 + 0.25 + 0 + 0.5 + 3 * 0.5) / 9 = 3.75 / 9
    assert ex["mean_S_chosen"] == pytest.approx(3.75 / 9, abs=1e-6)
    assert ex["mean_S_chosen_kept"] == 0.5


def test_scripted_switches_and_modes(tmp_path, monkeypatch):
    """filter off: best S_w wins: a -> k1 (0.75), b -> k2 (0.5 > 0.25 > 0), c -> k0 (tie).
    Only rule 1: a: k0 (0.5), k1 (0.75) survive -> k1; b: k2 -> k2.
    Only rule 2: a: k0, k2 survive -> k0 (0.5 > 0.25); b: k1 (0.0) survives -> k1.
    select=all: every survivor -> a.k0, c.k0, c.k1, c.k2 (4 records).
    select=random: a has one survivor (k0); c's is drawn with derive_seed(run seed, "select", "c"),
    the same draw in another workdir."""
    kept = lambda pairs: [(p["id"], p["k"]) for p in pairs]  # noqa: E731
    assert kept(_scripted_run(tmp_path, monkeypatch, "off", "vqa.filter=false")[2]) == [("a", 1), ("b", 2), ("c", 0)]
    assert kept(_scripted_run(tmp_path, monkeypatch, "r1", "vqa.drop_all_true_rejected=false")[2]) == \
        [("a", 1), ("b", 2), ("c", 0)]
    assert kept(_scripted_run(tmp_path, monkeypatch, "r2", "vqa.min_chosen_score=false")[2]) == \
        [("a", 0), ("b", 1), ("c", 0)]
    m, recs, pairs = _scripted_run(tmp_path, monkeypatch, "all", "vqa.select=all")
    assert kept(pairs) == [("a", 0), ("c", 0), ("c", 1), ("c", 2)] and m["extra"]["pairs_kept"] == 4
    _, r1, p1 = _scripted_run(tmp_path, monkeypatch, "rand1", "vqa.select=random")
    _, r2, p2 = _scripted_run(tmp_path, monkeypatch, "rand2", "vqa.select=random")
    want = random.Random(derive_seed(0, "select", "c")).choice([0, 1, 2])  # run.seed 0 in tiny.yaml
    assert kept(p1) == [("a", 0), ("c", want)] and p1 == p2 and r1["c"]["kept"] == [want]


# --- resume -------------------------------------------------------------------------------------

def test_interrupted_run_completes_each_id_once(tmp_path, monkeypatch, engine):
    """Killed on the second scoring batch (after p0 was committed), with a half line left in
    vqa.jsonl; the rerun does p1..p3 only and the files equal an uninterrupted run's."""
    qfile = _questions_file(tmp_path / "q.jsonl")
    cfg = tiny_cfg(f"vqa.input={qfile}", "vqa.batch_size=4")  # 4 images per commit = one id
    real = understanding.yes_no_probs
    n = {"calls": 0}

    def dying(*a, **kw):
        n["calls"] += 1
        if n["calls"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **kw)

    wd = tmp_path / "killed"
    _seed(wd)
    monkeypatch.setattr(vqa.understanding, "yes_no_probs", dying)
    with pytest.raises(KeyboardInterrupt):
        vqa.run(cfg, RunDir(wd), 0, lambda: engine)
    it = wd / "iter_00"
    assert [r["id"] for r in read_jsonl(it / "vqa.jsonl")] == ["p0"]
    with open(it / "vqa.jsonl", "a") as fh:
        fh.write('{"id": "p1", "prom')
    monkeypatch.setattr(vqa.understanding, "yes_no_probs", real)
    scored = []
    monkeypatch.setattr(vqa.understanding, "yes_no_probs",
                        lambda e, ims, qs, **kw: scored.append(len(ims)) or real(e, ims, qs, **kw))
    m = vqa.run(cfg, RunDir(wd), 0, lambda: engine)
    assert scored == [4, 4, 4]  # p1, p2, p3; p0 not redone
    ids = [r["id"] for r in read_jsonl(it / "vqa.jsonl")]
    ledger = [e["id"] for e in read_jsonl(it / "vqa.done")]
    assert ids == ledger == ["p0", "p1", "p2", "p3"] and m["counts"]["in"] == 4
    other = tmp_path / "clean"
    _seed(other)
    vqa.run(cfg, RunDir(other), 0, lambda: engine)

    for f in ("vqa.jsonl", "pairs.jsonl"):  # same model, same inputs: the same records
        assert read_jsonl(it / f) == read_jsonl(other / "iter_00" / f)
    assert m["extra"]["scoring"]["rows"] == 4 * 9  # p0 (first run) + p1..p3; the killed batch never counted


# --- the model's decomposition on random weights, bad inputs, limit ---------------------------

def test_decomposition_rejects_on_random_weights(tmp_path, engine):
    """No supplied questions: the random model writes the decompositions, which do not parse;
    every id is a counted reject (with the raw text kept), the stage ends with a clean error."""
    wd = tmp_path / "run"
    _seed(wd, n_pairs=1)
    cfg = tiny_cfg("vqa.input=null", "vqa.max_new_tokens=16")
    with pytest.raises(StageError, match="no prompt kept a pair"):
        vqa.run(cfg, RunDir(wd), 0, lambda: engine, limit=2)
    m = json.loads((wd / "iter_00" / "vqa.manifest.json").read_text())
    assert m["counts"] == {"in": 2, "out": 0, "rejected": 2}
    assert set(m["rejects"]) <= {"no_questions_found", "too_few_questions", "too_many_questions"}
    recs = read_jsonl(wd / "iter_00" / "vqa.jsonl")
    assert [r["id"] for r in recs] == ["p0", "p1"]
    for r in recs:
        assert r["question_source"] == "model" and r["decomposition"].startswith("Q:") and r["questions"] is None
    assert m["extra"]["question_source"] == {"model": 2} and m["extra"]["pairs_scored"] == 0


def test_leading_questions_and_user_checks():
    text = "Q: Is there a cat?\n\nQ: Is the cat black?\nPrompt: a dog\nQ: Is there a dog?"
    assert vqa.leading_questions(text) == "Q: Is there a cat?\nQ: Is the cat black?"
    ok = vqa.check_user_questions(["Is there a cat?", "Is the cat  black?"], min_questions=2, max_questions=3)
    assert ok == (["Is there a cat?", "Is the cat black?"], None)
    assert vqa.check_user_questions(["Is there a cat"], min_questions=1, max_questions=3) == (None, "not_a_question")
    assert vqa.check_user_questions(["Is there a cat?"] * 2, min_questions=2, max_questions=3) == \
        (None, "too_few_questions")  # duplicates count once
    assert vqa.check_user_questions([f"Is there cat {i}?" for i in range(4)], min_questions=1, max_questions=3) == \
        (None, "too_many_questions")


def test_bad_inputs_fail_before_the_model_loads(tmp_path):
    wd = tmp_path / "run"
    with pytest.raises(StageError, match="run the images stage first"):
        vqa.run(tiny_cfg("vqa.input=null"), RunDir(wd), 0, _no_model)
    _seed(wd, n_pairs=1)
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": "p0", "questions": ["Is it?"]}\n{"id": "p1", "questions": "Is it?"}\n')
    with pytest.raises(StageError, match="line 2 needs 'id' and 'questions'"):
        vqa.run(tiny_cfg(f"vqa.input={bad}"), RunDir(wd), 0, _no_model)
    with pytest.raises(StageError, match="does not exist"):
        vqa.run(tiny_cfg(f"vqa.input={tmp_path}/none.jsonl"), RunDir(wd), 0, _no_model)


def test_limit_and_supplied_only_ids(tmp_path, monkeypatch):
    """limit=2 caps the ids in file order; ids without supplied questions would need the
    model, ids with them never call generate_text."""
    monkeypatch.setattr(vqa.understanding, "yes_no_probs",
                        lambda e, ims, qs, **kw: [understanding.ImageScore([0.9] * len(q), [0.1] * len(q)) for q in qs])
    wd = tmp_path / "run"
    _seed(wd, n_pairs=1)
    qfile = _questions_file(tmp_path / "q.jsonl", {"p0": QUESTIONS["p0"], "p1": QUESTIONS["p1"]})

    class NoText:
        def generate_text(self, *a, **kw):
            raise AssertionError("decomposition asked for supplied ids")

    m = vqa.run(tiny_cfg(f"vqa.input={qfile}", "vqa.drop_all_true_rejected=false"), RunDir(wd), 0,
                lambda: NoText(), limit=2)
    assert m["counts"] == {"in": 2, "out": 2, "rejected": 0}
    assert [r["id"] for r in read_jsonl(wd / "iter_00" / "pairs.jsonl")] == ["p0", "p1"]
