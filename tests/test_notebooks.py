"""Issue 6: the two inspection notebooks run top to bottom, headless, on a tiny run made here
(stages prompts, perturb, images, vqa of configs/tiny.yaml), and ship without outputs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nbformat
import pytest

from ospo import run as ospo_run

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("attention_masks", "pairs")

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run, masks teacher-forced so the notebook's recompute cell redoes the maps with
    the model (the Otsu/union recompute runs for every mask source)."""
    wd = tmp_path_factory.mktemp("nbrun") / "run"
    for stage in ("prompts", "perturb", "images", "vqa"):
        rc = ospo_run.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--stage", stage, "--workdir", str(wd), "--limit", "4", "images.mask_source=teacher_forced"])
        assert rc == 0, stage
    assert (wd / "iter_00" / "pairs.jsonl").read_text().strip()
    return wd


def _execute(name: str, run_dir: Path, monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("OSPO_RUN_DIR", str(run_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on any failing cell
    return nb


def _outputs(cell):
    text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")
    pngs = sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []) if o.output_type == "display_data")
    errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
    return text, pngs, errors


def _cell(nb, needle):
    return next(c for c in nb.cells if c.cell_type == "code" and needle in c.source)


def test_attention_masks_notebook(tiny_run, monkeypatch):
    nb = _execute("attention_masks", tiny_run, monkeypatch)
    for c in nb.cells:
        if c.cell_type == "code":
            assert not _outputs(c)[2]
    # one figure per image of the shown id (orig + pert)
    text, pngs, _ = _outputs(_cell(nb, "plot_image_record"))
    assert pngs >= 2
    text, _, _ = _outputs(_cell(nb, "check_record"))
    assert "(teacher_forced)" in text and "'soft_maps_match': True" in text
    assert "MASK MATCHES: True" in text
    assert _outputs(_cell(nb, "recomputed M"))[1] == 1


def test_pairs_notebook(tiny_run, monkeypatch):
    nb = _execute("pairs", tiny_run, monkeypatch)
    text, pngs, errors = _outputs(_cell(nb, "plot_pair"))
    assert not errors and pngs >= 1
    assert "chosen  :" in text and "rejected:" in text and "S " in text
    text, pngs, _ = _outputs(_cell(nb, "plot_s_distributions"))
    assert pngs == 1 and "removed by rule" in text


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_ship_without_outputs(name):
    rel = f"notebooks/{name}.ipynb"
    sources = [(ROOT / rel).read_text()]
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", rel], cwd=ROOT, capture_output=True)
    if tracked.returncode == 0:  # also the version staged / committed in git
        for ref in (f":{rel}", f"HEAD:{rel}"):
            shown = subprocess.run(["git", "show", ref], cwd=ROOT, capture_output=True, text=True)
            if shown.returncode == 0:
                sources.append(shown.stdout)
    for src in sources:
        nb = nbformat.reads(src, as_version=4)
        for c in nb.cells:
            if c.cell_type == "code":
                assert c.outputs == [] and c.execution_count is None


def test_html_report_embeds_every_figure(tiny_run, tmp_path):
    """python -m ospo.report RUN_DIR: a page that stands alone (every <img> an embedded PNG),
    with the yields table, S histograms, example pairs and training curves."""
    import base64
    import re
    import shutil

    from ospo import report

    wd = tmp_path / "run"
    shutil.copytree(tiny_run, wd)
    assert ospo_run.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--stage", "train", "--workdir", str(wd), "images.mask_source=teacher_forced"]) == 0
    assert report.main([str(wd)]) == 0
    html = (wd / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    n_pairs = len((wd / "iter_00" / "pairs.jsonl").read_text().splitlines())
    assert len(srcs) == 1 + min(n_pairs, 6) + 1  # S histograms, pairs, training curves
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for needle in ("Per-stage yields", "<td>images</td>", "Self-VQA scores", "Example pairs", "Training"):
        assert needle in html
    # not a run directory: a clear error, exit 2
    assert report.main([str(tmp_path / "nothing")]) == 2
