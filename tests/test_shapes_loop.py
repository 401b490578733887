"""The default config end to end: ``python -m ospo.run --stage all`` with no ``--config``
runs the shipped ShapesWorld Janus through all five stages. Its own text (prompts,
perturbations, densifications, questions) goes through the real stage parsers; what it
writes is graded by the world's grammar; it trains and saves a checkpoint."""

from __future__ import annotations

import json

from ospo import run
from ospo.rundir import read_jsonl
from ospo.shapes import grammar as gr


def test_default_config_is_shapes_and_runs_the_loop_on_the_shipped_model(tmp_path):
    assert run.default_config_path().name == "shapes.yaml"
    wd = tmp_path / "run"
    rc = run.main(["--stage", "all", "--workdir", str(wd), "--limit", "40", "train.max_steps=2",
                   "prompts.samples_per_forward=8"])
    assert rc == 0
    it = wd / "iter_00"
    prompts = read_jsonl(it / "prompts.jsonl")
    assert len(prompts) >= 5 and all(p["source"] == "model" for p in prompts)
    # the model writes the world's language: most of its prompts parse into scenes
    assert sum(gr.parse(p["prompt"]) is not None for p in prompts) >= 0.6 * len(prompts)
    man1 = json.loads((it / "prompts.manifest.json").read_text())
    assert man1["finished"]
    variants = [v for r in read_jsonl(it / "variants.jsonl") for v in r["variants"] if "rejected" not in v]
    assert variants, "the model wrote no usable perturbation"
    assert all(v["perturbed"] and v.get("dense") and v.get("perturbed_dense") for v in variants)
    vqa = read_jsonl(it / "vqa.jsonl")
    assert vqa and all(r.get("questions") for r in vqa)
    pairs = read_jsonl(it / "pairs.jsonl")
    assert pairs
    assert (it / "checkpoint" / "config.json").exists()
    assert len(read_jsonl(it / "train_log.jsonl")) == 2
