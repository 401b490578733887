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
