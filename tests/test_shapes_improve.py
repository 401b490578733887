"""The ShapesWorld measurement command at a small size (one seed, one ablation, a few
prompts): it runs base evaluation, two OSPO iterations, an ablation branched from it, the
evaluation of each checkpoint, and writes the JSON and the chart."""

from __future__ import annotations

import json

from ospo.shapes import improve


def test_improve_small(tmp_path):
    out = tmp_path / "m"
    argv = ["--out", str(out), "--seeds", "0", "--ablations", "no_masks", "--limit", "40", "--eval-limit", "5",
            "--eval-seeds", "1", "--yes-no", "10", "--iterations", "2", "--set", "train.max_steps=2"]
    res = improve.main(argv)
    data = json.loads((out / "improve.json").read_text())
    assert (out / "improve.png").stat().st_size > 1000
    assert set(data["variants"]) == {"ospo", "no_masks", "ospo_iter2"}
    assert data["base"]["graded"] + data["base"]["ungradeable"] == 5
    ospo, abl = data["runs"]["s0-ospo"], data["runs"]["s0-no_masks"]
    # the ablation is a branch: it reused the OSPO run's stages 1-4 and trained with alpha = 0
    branch = json.loads((out / "runs" / "s0" / "no_masks" / "branch.json").read_text())
    assert branch["from"] == str(out / "runs" / "s0" / "ospo") and branch["first_stage"] == "train"
    # ...of the FIRST iteration, though the OSPO run went on to a second one
    assert branch["iteration"] == 0 and data["runs"]["s0-ospo_iter2"]["iteration"] == 1
    assert branch["reused_stages"] == ["prompts", "perturb", "images", "vqa"]
    assert ospo["loop"]["prompts_written"] == abl["loop"]["prompts_written"] > 0
    loop = ospo["loop"]
    # the stage-4 counts come from its manifest and match the pairs it wrote
    n_pairs = sum(1 for line in (out / "runs" / "s0" / "ospo" / "iter_00" / "pairs.jsonl").read_text().splitlines() if line)
    assert loop["vqa"]["pairs_kept"] == n_pairs
    # held-out overlap counts the prompts the evaluated checkpoint trained on (iteration 0),
    # not the second iteration's: the same for the OSPO run and its iteration-0 branch
    assert ospo["heldout_overlap"] == abl["heldout_overlap"]
    if ospo["heldout_overlap"] == 0:
        assert ospo["base_overall_without_overlap"] == data["base"]["overall"]
    # the command again resumes: the same numbers, no third iteration, the branch accepted
    again = improve.main(argv)
    assert again["variants"] == res["variants"]
    assert not (out / "runs" / "s0" / "ospo" / "iter_02").exists()
    assert loop["pairs_scored"]["n"] > 0
    f = loop["filter"]
    assert f["of"] == loop["pairs_scored"]["n"] and f["passed"] <= f["of"]
    for k in ("preference_null", "preference_false"):
        assert 0.0 <= loop["pairs_scored"][k] <= 1.0
    # the table's numbers are the evaluations' numbers
    assert abs(data["variants"]["ospo"]["mean"]["overall"] - ospo["summary"]["overall"]) < 1e-9
    assert abs(res["variants"]["ospo"]["gain_overall"] - (ospo["summary"]["overall"] - data["base"]["overall"])) < 1e-9
    assert "| base |" in improve.format_table(res)
