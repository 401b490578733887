"""The bench command runs end to end at the tiniest sizes (never a timed test: issue 7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_run_all_tiny_writes_every_section_and_plot(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    js = list(tmp_path.glob("*.json"))
    pngs = list(tmp_path.glob("*.png"))
    assert len(js) == 1 and len(pngs) == 1
    assert pngs[0].stat().st_size > 1000 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(js[0].read_text())
    res = doc["results"]
    for name in ("sampling", "vqa", "text", "train", "scaling", "cuda_bandwidth"):
        assert name in res, name
        assert "error" not in res[name], res[name].get("error")
    assert res["sampling"]["rows"] and res["sampling"]["rows"][0]["speedup_vs_stock"] is not None
    assert set(res["vqa"]["speedup_vs_loop"]) == {"loop", "per_row", "once", "prefix"}
    assert res["text"]["speedup_batched"] > 0
    assert {r["name"] for r in res["train"]["results"]} == {"concat", "two_fwd"}
    assert all("error" not in r for r in res["train"]["results"])
    assert [r["prompts"] for r in res["scaling"]["rows"]] == [1, 2]
    assert res["scaling"]["fit"]["slope_s_per_prompt"] is not None
    assert doc["machine"]["host"] and doc["plot"] == pngs[0].name
    if doc["machine"]["device"] == "cpu":
        assert "CUDA only" in res["cuda_bandwidth"]["skipped"]
        assert "not GPU throughput" in doc["markdown"]
    assert "| stage | measure | value |" in doc["markdown"] and "| scaling |" in doc["markdown"]
    assert "wrote" in proc.stdout


def test_sampling_ratios_are_paired_medians_and_public_batch1():
    """The machine's speed drifts between repeats: a ratio within each repeat (median over
    repeats) cancels it, a ratio of bests does not. Pure arithmetic on given times."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_sampling as bs

    # repeat 2 ran on a machine twice as slow for all three: paired ratios stay exact
    times = {"ours_nocap": [1.0, 2.0, 1.0], "ours_cap": [1.1, 2.2, 1.1], "stock": [2.0, 4.0, 2.0]}
    r = bs.summarize("tiny", 24, 576, 8, [1, 2], times)
    assert r["capture_overhead"] == 0.1 and r["speedup_vs_stock"] == round(2 / 1.1, 3)
    assert r["ours_cap_img_s"] == round(8 / 1.1, 3) and r["stock_img_s"] == 4.0
    # the bests came from different repeats: a ratio of bests would say -50%, the pairs say +10%
    drift = {"ours_nocap": [2.0, 2.0, 2.0], "ours_cap": [2.2, 1.0, 2.2]}
    assert bs.summarize("tiny", 8, 64, 1, [1], drift)["capture_overhead"] == 0.1
    rows = [bs.summarize("tiny", 8, 64, b, [1], {"ours_nocap": [t], "ours_cap": [t], "stock": [s]})
            for b, t, s in [(1, 0.5, 1.0), (8, 1.0, 4.0)]]
    bs.add_public_batch1(rows)
    assert rows[0]["vs_public_batch1"] == 2.0 and rows[1]["vs_public_batch1"] == 8.0  # 8 img/s vs 1 img/s


def test_scaling_inputs_are_distinct_prompts(tmp_path):
    """Stage 1 drops repeated prompt texts: the scaling bench's inputs must not repeat one, or
    a larger N does no more work (the bench once measured a flat line that way)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_scaling as bsc

    paths = bsc.write_inputs(tmp_path, 25)
    rows = [json.loads(x) for x in paths["prompts"].read_text().splitlines()]
    assert len(rows) == 25 and len({r["prompt"] for r in rows}) == 25 and len({r["id"] for r in rows}) == 25
    variants = {r["id"]: r for r in map(json.loads, paths["variants"].read_text().splitlines())}
    copies = [r for r in rows if r["id"].endswith("-r0012")]  # round 1 (10 tiny prompts per round)
    assert copies and copies[0]["prompt"].endswith(", copy 1")
    for r in rows:
        assert all(o in r["prompt"] for o in r.get("objects", []))
        for v in variants.get(r["id"], {}).get("variants", []):  # a variant's texts carry its prompt's suffix
            assert all(v[f].endswith(", copy 1") == r["prompt"].endswith(", copy 1")
                       for f in ("perturbed", "dense", "perturbed_dense") if f in v)


def test_pretrain_bench_times_both_layouts_and_checks_the_loss(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_pretrain

    out = tmp_path / "p.json"
    res = bench_pretrain.main(["--rows", "6", "--per-image", "3", "--text-rows", "5", "--repeats", "1", "--pool", "6",
                               "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == res
    assert set(res["seconds_median"]) == {"yes_no_separate", "yes_no_packed", "text_padded", "text_buckets", "text_packed"}
    assert all(v > 0 for v in res["seconds_median"].values()) and all(v > 0 for v in res["speedup"].values())
    # packed rows, buckets and packed text sequences give the separate rows' loss (a wrong mask or position would not)
    assert res["loss_rel_diff_max"]["yes_no"] < 1e-4 and res["loss_rel_diff_max"]["text"] < 1e-4


def test_malloc_bench_runs_each_allocator_in_its_own_process(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_malloc

    out = tmp_path / "m.json"
    res = bench_malloc.main(["--steps", "2", "--pool", "4", "--rounds", "1", "--threads", "1",
                             "--preload", str(tmp_path / "missing.so"), "--json", str(out)])
    assert json.loads(out.read_text()) == res
    assert set(res["median"]) == {"glibc_default", "glibc_tuned"}   # a library that is not there is skipped
    assert all(v > 0 for m in res["median"].values() for v in m.values())
    # the allocator must not change the math: both processes end at the same losses
    assert res["same_losses"] and res["final_losses"]["glibc_tuned"]["phase2"]["yes_no"] > 0
