"""The self-improvement loop end to end on the tiny config: ``--stage all --iterations 2``
(iteration 1 samples with the model iteration 0 trained, in memory), then a later run
that resumes from ``iter_01/checkpoint`` on disk and stops with a clear error and a
non-zero exit when stage 4 keeps no pair (it never trains on nothing)."""

from __future__ import annotations

import json
from pathlib import Path

from ospo import run
from ospo.rundir import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def _args(wd, model_dir, *extra):
    return ["--config", str(TINY), "--workdir", str(wd), "--limit", "4", f"model.path={model_dir}",
            "train.max_steps=2", *extra]


def test_two_iterations_then_resume_and_stop_on_no_pairs(tmp_path, tiny_model_dir, capsys):
    wd = tmp_path / "run"
    assert run.main(["--stage", "all", "--iterations", "2", *_args(wd, tiny_model_dir)]) == 0
    m0 = json.loads((wd / "iter_00" / "model.json").read_text())
    m1 = json.loads((wd / "iter_01" / "model.json").read_text())
    assert m0["path"] == tiny_model_dir
    assert Path(m1["path"]) == wd / "iter_00" / "checkpoint"
    assert "in memory" in m1["how"]
    for it in ("iter_00", "iter_01"):
        man = json.loads((wd / it / "train.manifest.json").read_text())
        assert man["finished"] and man["counts"]["out"] == 2
        assert (wd / it / "checkpoint" / "config.json").exists()
        assert len(read_jsonl(wd / it / "train_log.jsonl")) == 2
    # iteration 1 trained further: its checkpoint differs from iteration 0's
    from safetensors.torch import load_file

    w0 = load_file(str(wd / "iter_00" / "checkpoint" / "model.safetensors"))
    w1 = load_file(str(wd / "iter_01" / "checkpoint" / "model.safetensors"))
    key = next(k for k in w0 if "generation_head" in k)
    assert not (w0[key] == w1[key]).all()

    # Later: a new process resumes at iteration 2 from iter_01's checkpoint on disk; stage 4
    # keeps nothing (tau above any reachable score) and the loop stops with exit code 2.
    capsys.readouterr()
    rc = run.main(["--stage", "all", "--iterations", "1", *_args(wd, tiny_model_dir, "vqa.tau=1.0")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no prompt kept a pair" in err or "no pairs" in err
    m2 = json.loads((wd / "iter_02" / "model.json").read_text())
    assert Path(m2["path"]) == wd / "iter_01" / "checkpoint" and "from disk" in m2["how"]
    assert not (wd / "iter_02" / "checkpoint").exists()
    assert not (wd / "iter_02" / "train_log.jsonl").exists()
