"""Stages 1-2 end to end: the model path on random weights (reject paths), the accept
paths on supplied inputs and on a scripted engine, resume after interruption, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ospo import config, parsing
from ospo.rundir import RunDir, StageError, read_jsonl
from ospo.stages import perturb, prompts

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_cfg(*overrides):
    return config.load(TINY, list(overrides))


class Engine:
    """Holds a real engine; the lazy loader the stages get."""

    def __init__(self, engine):
        self.engine = engine
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.engine


class Scripted:
    """A stand-in engine that answers like a model that follows the templates.

    Stage logic (quotas, dedupe, few-shot refresh, slots, resume) is tested against it;
    the real model path is tested on the tiny Janus below.
    """

    def __init__(self, fail_after: int | None = None):
        self.batches = 0
        self.fail_after = fail_after

    def generate_text(self, texts, *, seeds, prefix="", **kw):
        self.batches += 1
        if self.fail_after is not None and self.batches > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        outs = []
        for t, s in zip(texts, seeds):
            n = s % 1000
            if prefix == "Prompt:":
                outs.append(f"Prompt: a red cube number {n} and a blue ball\nObjects: cube, ball\n"
                            f"Prompt: a green cone {n}\nObjects: pyramid\n")  # second one: bad objects
            elif prefix == "Perturbed:":
                src = t.rsplit("Prompt: ", 1)[1]
                if t.startswith("Swap"):
                    w = src.split()
                    outs.append("Perturbed: " + " ".join(reversed(w)))
                elif t.startswith("Remove"):
                    outs.append("Perturbed: " + " ".join(src.split()[:-2]))
                else:
                    outs.append("Perturbed: " + src + " and a purple hat")
            elif prefix == "Dense A:":
                a = t.split("\nA: ")[-1].split("\nB: ")[0]
                b = t.split("\nB: ")[-1]
                outs.append(f"Dense A: {a} in a sunny park\nDense B: {b} in a sunny park\n")
            else:
                outs.append(prefix + " nothing")
        return outs


def test_prompts_model_path_on_random_weights_counts_rejects(tmp_path, engine):
    cfg = tiny_cfg("prompts.input=null", "prompts.num_prompts=4", "prompts.sub_categories=[color,numeracy]",
                   "prompts.max_requests_factor=2", "prompts.max_new_tokens=24")
    rd = RunDir(tmp_path)
    with pytest.raises(StageError, match="no prompt was accepted"):
        prompts.run(cfg, rd, 0, Engine(engine))
    m = json.loads((tmp_path / "iter_00" / "prompts.manifest.json").read_text())
    assert m["counts"]["out"] == 0 and m["counts"]["rejected"] > 0
    assert set(m["rejects"]) <= {"no_prompt_found", "missing_objects", "object_not_in_prompt", "empty_prompt",
                                 "too_many_objects", "duplicate"}
    assert m["extra"]["quota_unmet"] == {"color": "0/2", "numeracy": "0/2"}
    # 2 prompts * factor 2 / 3 per request -> 2 requests per sub-category, each one ledgered
    requests = {(e["sub"], e["request"]) for e in read_jsonl(tmp_path / "iter_00" / "prompts.done")}
    assert requests == {("color", 0), ("color", 1), ("numeracy", 0), ("numeracy", 1)}


def test_prompts_accept_path_quota_dedupe_refresh(tmp_path):
    cfg = tiny_cfg("prompts.input=null", "prompts.num_prompts=12", "prompts.sub_categories=[color,spatial_2d]",
                   "prompts.refresh_every=2", "prompts.samples_per_forward=2")
    eng = Scripted()
    rd = RunDir(tmp_path)
    m = prompts.run(cfg, rd, 0, lambda: eng)
    recs = read_jsonl(tmp_path / "iter_00" / "prompts.jsonl")
    assert m["counts"]["out"] == 12 == len(recs)
    assert [r["sub_category"] for r in recs].count("color") == 6
    assert len({parsing.normalize(r["prompt"]) for r in recs}) == 12
    assert all(set(r) >= {"id", "category", "sub_category", "prompt", "objects"} for r in recs)
    assert m["rejects"]["object_not_in_prompt"] >= 6  # the scripted second candidate of every answer
    # few-shot refresh: after refresh_every accepts, examples come from accepted prompts
    shots = prompts.few_shots(cfg, "color", [(r["prompt"], r["objects"]) for r in recs if r["sub_category"] == "color"], 9)
    assert all("cube number" in p for p, _ in shots)


def test_prompts_resume_after_kill(tmp_path):
    cfg = tiny_cfg("prompts.input=null", "prompts.num_prompts=10", "prompts.sub_categories=[color]",
                   "prompts.samples_per_forward=2")
    rd = RunDir(tmp_path)
    killed = Scripted(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        prompts.run(cfg, rd, 0, lambda: killed)
    partial = read_jsonl(tmp_path / "iter_00" / "prompts.jsonl")
    assert 0 < len(partial) < 10
    # a half-written line from the killed writer
    with open(tmp_path / "iter_00" / "prompts.jsonl", "a") as fh:
        fh.write('{"id": "color-9999", "prom')
    m = prompts.run(cfg, rd, 0, lambda: Scripted())
    recs = read_jsonl(tmp_path / "iter_00" / "prompts.jsonl")
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)) == 10 == m["counts"]["out"]
    assert recs[: len(partial)] == partial  # nothing already written was lost
    ledger = read_jsonl(tmp_path / "iter_00" / "prompts.done")
    assert len({e["id"] for e in ledger}) == len(ledger)  # rejects not redone, not doubled
    # a rerun is a no-op
    before = (tmp_path / "iter_00" / "prompts.jsonl").read_text()
    eng = Scripted()
    prompts.run(cfg, rd, 0, lambda: eng)
    assert eng.batches == 0 and (tmp_path / "iter_00" / "prompts.jsonl").read_text() == before


def test_user_prompts_and_object_naming_on_random_weights(tmp_path, engine):
    cfg = tiny_cfg()
    lazy = Engine(engine)
    m = prompts.run(cfg, RunDir(tmp_path), 0, lazy)
    # 8 supplied with objects are accepted; 2 without objects go to the random model and are rejected
    assert m["counts"] == {"in": 10, "out": 8, "rejected": 2}
    assert lazy.calls == 1


def test_bad_user_prompts_fail_before_the_model_loads(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"prompt": \n')
    cfg = tiny_cfg(f"prompts.input={bad}")

    def no_model():
        raise AssertionError("model loaded")

    with pytest.raises(StageError, match="line 2 is not valid JSON"):
        prompts.run(cfg, RunDir(tmp_path / "run"), 0, no_model)
    with pytest.raises(StageError, match="does not exist"):
        prompts.run(tiny_cfg(f"prompts.input={tmp_path}/none.jsonl"), RunDir(tmp_path / "run"), 0, no_model)


def _seed_prompts(tmp_path, recs):
    d = tmp_path / "iter_00"
    d.mkdir(parents=True)
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


PROMPTS = [
    {"id": "a", "category": "attribute", "sub_category": "color", "prompt": "a red cube and a blue ball", "objects": ["cube", "ball"]},
    {"id": "b", "category": "layout", "sub_category": "spatial_2d", "prompt": "a dog to the left of a bench", "objects": ["dog", "bench"]},
    {"id": "c", "category": "layout", "sub_category": "numeracy", "prompt": "three apples", "objects": ["apples"]},
]


def test_perturb_slots_schedule_and_densify(tmp_path):
    _seed_prompts(tmp_path, PROMPTS)
    cfg = tiny_cfg("perturb.input=null", "perturb.num_variants=3")
    m = perturb.run(cfg, RunDir(tmp_path), 0, lambda: Scripted())
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "iter_00" / "variants.jsonl")}
    assert [v["k"] for v in recs["a"]["variants"]] == [0, 1, 2]
    a = recs["a"]["variants"]
    assert [v.get("op") for v in a] == ["replace", "swap", "drop"]
    for v in a:
        assert v["dense"].endswith("in a sunny park") and v["dense"] != v["perturbed_dense"]
    # numeracy: replace, replace, drop; one object and 'three apples' -> drop leaves nothing
    c = recs["c"]["variants"]
    assert [v.get("op", v.get("rejected")) for v in c][:2] == ["replace", "replace"]
    assert c[2]["rejected"] in ("empty_perturbation", "drop_not_shorter")
    assert m["counts"]["out"] == 3 and m["extra"]["slots_accepted"] == 8


def test_perturb_swap_impossible_and_no_densify(tmp_path):
    _seed_prompts(tmp_path, [PROMPTS[2] | {"sub_category": "color"}])
    cfg = tiny_cfg("perturb.input=null", "perturb.num_variants=3", "perturb.densify=false")
    perturb.run(cfg, RunDir(tmp_path), 0, lambda: Scripted())
    (rec,) = read_jsonl(tmp_path / "iter_00" / "variants.jsonl")
    assert rec["variants"][1] == {"k": 1, "rejected": "swap_impossible"}
    v0 = rec["variants"][0]
    assert v0["dense"] == rec["prompt"] and v0["perturbed_dense"] == v0["perturbed"]


def test_perturb_model_path_on_random_weights_and_supplied(tmp_path, engine):
    _seed_prompts(tmp_path, PROMPTS)
    cfg = tiny_cfg("perturb.input=null")
    with pytest.raises(StageError, match="no prompt got an accepted variant"):
        perturb.run(cfg, RunDir(tmp_path), 0, Engine(engine))
    m = json.loads((tmp_path / "iter_00" / "perturb.manifest.json").read_text())
    assert m["rejects"] == {"no_accepted_variant": 3} and sum(m["extra"]["slot_rejects"].values()) == 6


def test_perturb_resume_and_config_change(tmp_path):
    _seed_prompts(tmp_path, PROMPTS)
    cfg = tiny_cfg("perturb.input=null", "perturb.batch_size=2")  # 1 prompt per group
    rd = RunDir(tmp_path)
    killed = Scripted(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        perturb.run(cfg, rd, 0, lambda: killed)  # perturb+densify of group 1, then killed
    assert len(read_jsonl(tmp_path / "iter_00" / "variants.jsonl")) == 1
    perturb.run(cfg, rd, 0, lambda: Scripted())
    ids = [r["id"] for r in read_jsonl(tmp_path / "iter_00" / "variants.jsonl")]
    assert ids == ["a", "b", "c"]
    # same variants as an uninterrupted run (seeds derive from ids)
    other = tmp_path / "other"
    _seed_prompts(other, PROMPTS)
    perturb.run(cfg, RunDir(other), 0, lambda: Scripted())
    assert read_jsonl(other / "iter_00" / "variants.jsonl") == read_jsonl(tmp_path / "iter_00" / "variants.jsonl")
    # a changed config is refused with the key named; --force redoes it and marks later stages stale
    (tmp_path / "iter_00" / "images.manifest.json").write_text("{}")
    with pytest.raises(StageError, match="perturb.num_variants"):
        perturb.run(tiny_cfg("perturb.input=null", "perturb.num_variants=3"), rd, 0, lambda: Scripted())
    perturb.run(tiny_cfg("perturb.input=null", "perturb.num_variants=3"), rd, 0, lambda: Scripted(), force=True)
    assert all(len(r["variants"]) == 3 for r in read_jsonl(tmp_path / "iter_00" / "variants.jsonl"))
    assert (tmp_path / "iter_00" / "images.stale").exists()


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ospo.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_cli_prompts_then_perturb_then_noop(tmp_path):
    """The README's 'Done when': prompts then perturb on configs/tiny.yaml; a rerun is a no-op."""
    wd = tmp_path / "x"
    r1 = _cli("--stage", "prompts", "--config", str(TINY), "--workdir", str(wd), cwd=ROOT)
    assert r1.returncode == 0, r1.stderr
    r2 = _cli("--stage", "perturb", "--config", str(TINY), "--workdir", str(wd), cwd=ROOT)
    assert r2.returncode == 0, r2.stderr
    it = wd / "iter_00"
    for f in ("prompts.jsonl", "prompts.done", "prompts.manifest.json", "variants.jsonl", "perturb.done",
              "perturb.manifest.json", "model.json"):
        assert (it / f).exists(), f
    assert (wd / "config.yaml").exists()
    assert len(read_jsonl(it / "prompts.jsonl")) == 8
    before = {f: (it / f).read_text() for f in ("prompts.jsonl", "variants.jsonl", "perturb.done")}
    r3 = _cli("--stage", "perturb", "--config", str(TINY), "--workdir", str(wd), cwd=ROOT)
    assert r3.returncode == 0 and "loading model" not in r3.stdout
    assert before == {f: (it / f).read_text() for f in before}
    # a changed config is refused with the key named, exit code 2, nothing lost
    r4 = _cli("--stage", "perturb", "--config", str(TINY), "--workdir", str(wd), "perturb.num_variants=3", cwd=ROOT)
    assert r4.returncode == 2 and "perturb.num_variants" in r4.stderr and "Traceback" not in r4.stderr
    assert before == {f: (it / f).read_text() for f in before}
    r5 = _cli("--stage", "prompts", "--config", str(TINY), "--workdir", str(wd), "vqa.tau=7", cwd=ROOT)
    assert r5.returncode == 2 and "vqa.tau" in r5.stderr


def test_seed_examples_file_replaces_builtin_shots(tmp_path):
    f = tmp_path / "seeds.jsonl"
    f.write_text('{"sub_category": "color", "prompt": "a red circle", "objects": ["circle"]}\n')
    cfg = tiny_cfg(f"prompts.seed_examples={f}", "prompts.input=null", "prompts.num_prompts=1",
                   "prompts.sub_categories=[color]")
    seen = []

    class Spy(Scripted):
        def generate_text(self, texts, **kw):
            seen.extend(texts)
            return super().generate_text(texts, **kw)

    eng = Spy()
    prompts.run(cfg, RunDir(tmp_path / "run"), 0, lambda: eng)
    assert "Prompt: a red circle\nObjects: circle" in seen[0] and "apple" not in seen[0]
    f.write_text('{"sub_category": "color", "prompt": "a red circle", "objects": ["square"]}\n')
    with pytest.raises(StageError, match="object_not_in_prompt"):
        prompts.run(cfg, RunDir(tmp_path / "run2"), 0, lambda: eng)
