"""The ShapesWorld measurement command at a small size (one seed, one ablation, a few
prompts): it runs base evaluation, two OSPO iterations, an ablation branched from it, the
evaluation of each checkpoint, and writes the JSON and the chart."""

from __future__ import annotations

import json

import pytest

from ospo.shapes import improve


def test_improve_small(tmp_path):
    out = tmp_path / "m"
    argv = ["--out", str(out), "--seeds", "0", "--ablations", "no_masks", "no_filter", "oracle_filter", "--limit", "40", "--eval-limit", "5",
            "--eval-seeds", "1", "--yes-no", "10", "--iterations", "2", "--set", "train.max_steps=2"]
    res = improve.main(argv)
    data = json.loads((out / "improve.json").read_text())
    assert (out / "improve.png").stat().st_size > 1000
    assert set(data["variants"]) == {"ospo", "no_masks", "no_filter", "oracle_filter", "ospo_iter2"}
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
    # the oracle branches the no_filter run before training and trains on its preference-true pairs
    ob = json.loads((out / "runs" / "s0" / "oracle_filter" / "branch.json").read_text())
    assert ob["from"] == str(out / "runs" / "s0" / "no_filter") and ob["first_stage"] == "train"
    orc = data["runs"]["s0-oracle_filter"]["loop"]["oracle"]
    nf_pairs = (out / "runs" / "s0" / "no_filter" / "iter_00" / "pairs.jsonl").read_text().splitlines()
    or_pairs = (out / "runs" / "s0" / "oracle_filter" / "iter_00" / "pairs.jsonl").read_text().splitlines()
    assert orc["pairs_in"] == len(nf_pairs) and 0 < orc["pairs_kept"] == len(or_pairs) < len(nf_pairs)
    nf_by_id = {json.loads(x)["id"]: json.loads(x) for x in nf_pairs}
    assert all(json.loads(x) == nf_by_id[json.loads(x)["id"]] for x in or_pairs)
    assert (out / "runs" / "s0" / "oracle_filter" / "iter_00" / "checkpoint" / "config.json").exists()
    # the command again resumes: the same numbers, no third iteration, the branch accepted
    again = improve.main(argv)
    assert json.loads((out / "improve.json").read_text())["runs"]["s0-oracle_filter"]["loop"]["oracle"] == orc
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


def test_oracle_pairs_keeps_only_preference_true_pairs(tmp_path):
    import numpy as np
    from PIL import Image

    from ospo.shapes import grammar as gr
    from ospo.shapes import world as w

    it = tmp_path / "iter_00"
    (it / "images").mkdir(parents=True)
    prompt = "a red circle"
    good = w.render(w.sample_layout(gr.parse(prompt), w.scene_rng(0, "t")))
    blank = np.full_like(good, 255)
    Image.fromarray(good).save(it / "images" / "good.png")
    Image.fromarray(blank).save(it / "images" / "blank.png")
    side = lambda name: {"image": f"iter_00/images/{name}.png", "tokens": [0]}  # noqa: E731
    pairs = [{"id": "a", "prompt": prompt, "chosen": side("good"), "rejected": side("blank")},      # true
             {"id": "b", "prompt": prompt, "chosen": side("blank"), "rejected": side("good")},      # false
             {"id": "c", "prompt": prompt, "chosen": side("good"), "rejected": side("good")},       # null
             {"id": "d", "prompt": "a photo of a dog", "chosen": side("good"), "rejected": side("blank")}]
    gr.write_jsonl(it / "pairs.jsonl", pairs)
    info = improve.oracle_pairs(tmp_path, 0)
    assert info == {"pairs_in": 4, "pairs_kept": 1, "ungradeable": 1}
    kept = [json.loads(line) for line in (it / "pairs.jsonl").read_text().splitlines() if line]
    assert [p["id"] for p in kept] == ["a"] and kept[0] == pairs[0]
    # a second call keeps the first result instead of filtering the filtered file again
    assert improve.oracle_pairs(tmp_path, 0) == info
    gr.write_jsonl(it / "pairs.jsonl", pairs[1:2])
    (it / "oracle.json").unlink()
    with pytest.raises(RuntimeError, match="no preference-true pair"):
        improve.oracle_pairs(tmp_path, 0)
