"""Branching runs (issue 10): an ablation that changes only later stages reuses another run's
finished stages; the branch records its source; the source is never modified."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ospo import run as ospo_run

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    wd = tmp_path_factory.mktemp("branch") / "base"
    for stage in ("prompts", "perturb", "images", "vqa"):
        assert ospo_run.main(["--config", TINY, "--stage", stage, "--workdir", str(wd), "--limit", "3"]) == 0, stage
    return wd


def test_branch_reruns_later_stage_and_never_touches_the_source(base, tmp_path, capsys):
    before = _snapshot(base)
    br = tmp_path / "nofilter"
    assert ospo_run.main(["--config", TINY, "--stage", "vqa", "--from", str(base), "--workdir", str(br), "vqa.filter=false"]) == 0
    info = json.loads((br / "branch.json").read_text())
    assert info["from"] == str(base.resolve()) and info["reused_stages"] == ["prompts", "perturb", "images"]
    assert (br / "iter_00" / "images").is_symlink()
    assert (br / "iter_00" / "images.jsonl").read_bytes() == (base / "iter_00" / "images.jsonl").read_bytes()
    m_base = json.loads((base / "iter_00" / "vqa.manifest.json").read_text())
    m_br = json.loads((br / "iter_00" / "vqa.manifest.json").read_text())
    assert m_br["config"]["vqa.filter"] is False and m_base["config"]["vqa.filter"] is True
    # training in the branch, then redoing its images with --force: the source stays as it was
    assert ospo_run.main(["--config", TINY, "--stage", "train", "--workdir", str(br), "vqa.filter=false"]) == 0
    assert ospo_run.main(["--config", TINY, "--stage", "images", "--workdir", str(br), "--iteration", "0", "--force",
                          "vqa.filter=false", "images.guidance_scale=3.0"]) == 0
    assert not (br / "iter_00" / "images").is_symlink()
    assert _snapshot(base) == before


def test_branch_refuses_a_config_that_changes_a_reused_stage(base, tmp_path, capsys):
    br = tmp_path / "bad"
    rc = ospo_run.main(["--config", TINY, "--stage", "vqa", "--from", str(base), "--workdir", str(br), "images.guidance_scale=3.0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "images" in err and "guidance_scale" in err
    assert ospo_run.main(["--config", TINY, "--stage", "all", "--from", str(base), "--workdir", str(br)]) == 2
    assert "--from-stage" in capsys.readouterr().err
    assert ospo_run.main(["--config", TINY, "--stage", "vqa", "--from", str(tmp_path / "nothing"), "--workdir", str(br)]) == 2


def test_branch_stage_all_from_stage(base, tmp_path):
    br = tmp_path / "alpha0"
    assert ospo_run.main(["--config", TINY, "--stage", "all", "--from", str(base), "--from-stage", "train", "--workdir", str(br),
                          "train.loss=simpo"]) == 0
    assert (br / "iter_00" / "checkpoint" / "config.json").exists()
    assert not (base / "iter_00" / "checkpoint").exists()
    log = [json.loads(x) for x in (br / "iter_00" / "train_log.jsonl").read_text().splitlines()]
    assert log and all("loss/simpo" in r for r in log)
    # the same command again resumes the branch: accepted, nothing redone, no new iteration
    ckpt = _snapshot(br / "iter_00" / "checkpoint")
    assert ospo_run.main(["--config", TINY, "--stage", "all", "--from", str(base), "--from-stage", "train", "--workdir", str(br),
                          "train.loss=simpo"]) == 0
    assert _snapshot(br / "iter_00" / "checkpoint") == ckpt and not (br / "iter_01").exists()
