"""python -m ospo.evaluate: prompt files in each benchmark's format, the output tree its
scorer reads, resume, sharding, and bad input refused before any model loads.

Two kinds of test:
- layout tests run with a stub engine and stub sampler (fast, no model): they pin names,
  counts, sizes, seeds and resume behaviour;
- integration tests run the real tiny Janus through ospo.sampling end to end.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from ospo import benchmarks, evaluate
from ospo.rundir import derive_seed, read_jsonl

GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "cow", "count": 1}, {"class": "cup", "count": 1}],
     "prompt": "a photo of a cow and a cup"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
     "prompt": "a photo of two dogs"},
]
T2I_LINES = ["a green bench and a blue bowl", "A bathroom with white tile and a beige toilet.",
             "two boys\tignored column"]
DPG_PROMPTS = {"1": "A red pickup truck parked on a sandy beach at dusk.",
               "10": "A blue bird on a branch.", "2": "Three apples on a wooden table."}


def write_geneval(tmp: Path) -> Path:
    p = tmp / "evaluation_metadata.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in GENEVAL_LINES))
    return p


def write_t2i(tmp: Path) -> Path:
    p = tmp / "color_val.txt"
    p.write_text("\n".join(T2I_LINES))  # the real files have no final newline
    return p


def write_dpg(tmp: Path) -> Path:
    d = tmp / "dpg_prompts"
    d.mkdir()
    for stem, text in DPG_PROMPTS.items():
        (d / f"{stem}.txt").write_text(text)
    return d


# --- stubs --------------------------------------------------------------------------------

STUB_PX = 16


class StubEngine:
    path = "stub"

    def image_prompt_ids(self, prompts):
        return [[len(p) % 97, 1, 2] for p in prompts]


def _stub_sampling(calls: list):
    mod = types.ModuleType("ospo.sampling")

    class Result:
        def __init__(self, tokens):
            self.tokens = tokens

    def sample_images(engine, input_ids, seeds, *, guidance_scale, temperature=1.0, batch_size=8, capture=None):
        calls.append(len(input_ids))
        # The image depends on (prompt ids, seed) only: never on its batch neighbours.
        return [Result([ids[0], s % 251, (s >> 8) % 251]) for ids, s in zip(input_ids, seeds)]

    def decode_images(engine, token_lists, *, batch_size=16):
        return [Image.new("RGB", (STUB_PX, STUB_PX), tuple(t[:3])) for t in token_lists]

    mod.sample_images = sample_images
    mod.decode_images = decode_images
    return mod


@pytest.fixture
def stub(monkeypatch):
    """Stub model + sampler; records sampler calls and model loads."""
    calls, loads = [], []
    import ospo
    import ospo.engine

    mod = _stub_sampling(calls)
    monkeypatch.setitem(sys.modules, "ospo.sampling", mod)
    monkeypatch.setattr(ospo, "sampling", mod, raising=False)

    def fake_load(cls, cfg=None, *, path=None):
        loads.append(path or cfg.path)
        return StubEngine()

    monkeypatch.setattr(ospo.engine.Engine, "load", classmethod(fake_load))
    return types.SimpleNamespace(calls=calls, loads=loads)


@pytest.fixture
def no_model(monkeypatch):
    import ospo.engine

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ospo.engine.Engine, "load", classmethod(refuse))


def run(*argv) -> int:
    return evaluate.main([str(a) for a in argv])


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


# --- layouts (stub sampler) ---------------------------------------------------------------

def test_geneval_layout(tmp_path, stub):
    out = tmp_path / "out"
    assert run("--benchmark", "geneval", "--prompts", write_geneval(tmp_path), "--checkpoint", "tiny:",
               "--out", out) == 0
    # evaluate_images.py: digit-named folders, metadata.jsonl json.load()-able, samples/\d+.png
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.isdigit())
    assert folders == ["00000", "00001", "00002"]
    for i, name in enumerate(folders):
        meta = json.loads((out / name / "metadata.jsonl").read_text())
        assert meta == GENEVAL_LINES[i]
        samples = sorted((out / name / "samples").iterdir())
        assert [p.name for p in samples] == ["0000.png", "0001.png", "0002.png", "0003.png"]  # default 4
        assert all(re.match(r"\d+\.png", p.name) for p in samples)
        assert all(png_size(p) == (STUB_PX, STUB_PX) for p in samples)
    m = json.loads((out / "evaluate.manifest.json").read_text())
    assert m["benchmark"] == "geneval" and m["samples_per_prompt"] == 4 and m["guidance_scale"] == 5.0
    assert m["counts"]["prompts"] == 3 and m["counts"]["done"] == 3 and m["finished"] is True
    assert m["image_px"] == [STUB_PX, STUB_PX] and "seed_rule" in m and "time" in m and "seconds" in m
    assert stub.loads == ["tiny:"]


def test_t2i_compbench_layout(tmp_path, stub):
    out = tmp_path / "out"
    assert run("--benchmark", "t2i-compbench", "--prompts", write_t2i(tmp_path), "--checkpoint", "tiny:",
               "--out", out, "--samples-per-prompt", "3", "--batch-size", "4") == 0
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert len(names) == 9
    # The scorers: prompt = name.split('_')[0]; question_id = int(name.split('_')[-1].split('.')[0])
    by_id = {int(n.split("_")[-1].split(".")[0]): n.split("_")[0] for n in names}
    prompts = [line.split("\t")[0] for line in T2I_LINES]
    assert by_id == {i * 3 + j: prompts[i] for i in range(3) for j in range(3)}
    assert "a green bench and a blue bowl_000000.png" in names
    assert all(png_size(out / "samples" / n) == (STUB_PX, STUB_PX) for n in names)
    # nothing else in samples/ (the scorers list it and parse every name)
    assert not any(n.startswith(".") for n in names)


def test_t2i_default_is_ten_per_prompt(tmp_path, stub):
    out = tmp_path / "out"
    assert run("--benchmark", "t2i-compbench", "--prompts", write_t2i(tmp_path), "--checkpoint", "tiny:",
               "--out", out, "--limit", "1") == 0
    assert len(list((out / "samples").iterdir())) == 10


def test_dpg_bench_layout(tmp_path, stub):
    out = tmp_path / "out"
    assert run("--benchmark", "dpg-bench", "--prompts", write_dpg(tmp_path), "--checkpoint", "tiny:",
               "--out", out) == 0
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["1.png", "10.png", "2.png"]  # compute_dpg_bench.py: key = basename.split('.')[0]
    for n in names:
        assert png_size(out / "images" / n) == (2 * STUB_PX, 2 * STUB_PX)  # 2x2 grid, --resolution 16
    # the tiles are the 4 samples in the scorer's crop order: TL, TR, BL, BR
    seeds = [derive_seed(0, "evaluate", "dpg-bench", "1", j) for j in range(4)]
    with Image.open(out / "images" / "1.png") as grid:
        r = STUB_PX
        crops = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]
        for s, box in zip(seeds, crops):
            assert grid.crop(box).getpixel((1, 1))[1:] == (s % 251, (s >> 8) % 251)


def test_seeds_do_not_depend_on_batching_or_limit(tmp_path, stub):
    a, b = tmp_path / "a", tmp_path / "b"
    p = write_geneval(tmp_path)
    assert run("--benchmark", "geneval", "--prompts", p, "--checkpoint", "tiny:", "--out", a,
               "--batch-size", "1") == 0
    assert run("--benchmark", "geneval", "--prompts", p, "--checkpoint", "tiny:", "--out", b,
               "--batch-size", "64", "--limit", "2") == 0
    for rel in ["00000/samples/0003.png", "00001/samples/0000.png"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "00000/samples/0000.png").read_bytes() != (a / "00000/samples/0001.png").read_bytes()


def test_batches_group_prompts(tmp_path, stub):
    assert run("--benchmark", "geneval", "--prompts", write_geneval(tmp_path), "--checkpoint", "tiny:",
               "--out", tmp_path / "o", "--batch-size", "8") == 0
    assert stub.calls == [8, 4]  # 2 prompts x 4 samples, then the last prompt


def test_resume_skips_done_and_redoes_only_the_removed(tmp_path, stub):
    out = tmp_path / "out"
    p = write_geneval(tmp_path)
    args = ["--benchmark", "geneval", "--prompts", p, "--checkpoint", "tiny:", "--out", out]
    assert run(*args) == 0
    before = {f: f.stat().st_mtime_ns for f in out.rglob("*.png")}
    # second run: nothing to do, no model loaded
    stub.loads.clear()
    assert run(*args) == 0
    assert stub.loads == []
    m = json.loads((out / "evaluate.manifest.json").read_text())
    assert m["counts"]["generated_this_run"] == 0 and m["counts"]["done"] == 3
    # remove one output and its ledger line: only that prompt is regenerated
    ledger = out / "evaluate.done"
    recs = read_jsonl(ledger)
    assert sorted(r["index"] for r in recs) == [0, 1, 2]
    ledger.write_text("".join(json.dumps(r) + "\n" for r in recs if r["index"] != 1))
    gone = out / "00001" / "samples" / "0002.png"
    gone.unlink()
    stub.calls.clear()
    assert run(*args) == 0
    assert stub.calls == [4]
    assert gone.exists()
    after = {f: f.stat().st_mtime_ns for f in out.rglob("*.png")}
    changed = sorted(str(f.relative_to(out)) for f in after if before.get(f) != after[f])
    assert all(c.startswith("00001/") for c in changed) and len(changed) == 4
    assert sorted(r["index"] for r in read_jsonl(ledger)) == [0, 1, 2]


def test_missing_file_with_ledger_line_is_redone(tmp_path, stub):
    out = tmp_path / "out"
    args = ["--benchmark", "dpg-bench", "--prompts", write_dpg(tmp_path), "--checkpoint", "tiny:", "--out", out]
    assert run(*args) == 0
    (out / "images" / "2.png").unlink()
    stub.calls.clear()
    assert run(*args) == 0
    assert stub.calls == [4] and (out / "images" / "2.png").exists()


def test_changed_settings_refused_then_forced(tmp_path, stub, capsys):
    out = tmp_path / "out"
    p = write_geneval(tmp_path)
    base = ["--benchmark", "geneval", "--prompts", p, "--checkpoint", "tiny:", "--out", out]
    assert run(*base, "--samples-per-prompt", "2") == 0
    capsys.readouterr()
    assert run(*base, "--samples-per-prompt", "3") == 2
    assert "samples_per_prompt" in capsys.readouterr().err
    assert run(*base, "--samples-per-prompt", "3", "--force") == 0
    assert sorted(p.name for p in (out / "00000" / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]


def test_sharding_by_rank(tmp_path, stub, monkeypatch):
    out = tmp_path / "out"
    p = write_t2i(tmp_path)
    args = ["--benchmark", "t2i-compbench", "--prompts", p, "--checkpoint", "tiny:", "--out", out,
            "--samples-per-prompt", "2"]
    # Two ranks run one after the other (no process group: dist falls back to the env vars).
    monkeypatch.setattr(evaluate.dist, "init", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run(*args) == 0
    assert sorted(r["index"] for r in read_jsonl(out / "evaluate.rank1.done")) == [1]
    monkeypatch.setenv("RANK", "0")
    assert run(*args) == 0
    assert sorted(r["index"] for r in read_jsonl(out / "evaluate.rank0.done")) == [0, 2]
    assert len(list((out / "samples").iterdir())) == 6
    m = json.loads((out / "evaluate.manifest.json").read_text())
    assert m["counts"]["done"] == 3 and m["world_size"] == 2


# --- bad input: exit 2, message, no model ------------------------------------------------

def _err(capsys) -> str:
    return capsys.readouterr().err


def test_unknown_benchmark(tmp_path, no_model, capsys):
    with pytest.raises(SystemExit) as e:
        run("--benchmark", "mmbench", "--prompts", write_t2i(tmp_path), "--checkpoint", "tiny:", "--out", tmp_path / "o")
    assert e.value.code == 2
    assert "mmbench" in _err(capsys)


@pytest.mark.parametrize("bench,make,needle", [
    ("geneval", write_t2i, "not JSON"),
    ("geneval", write_dpg, "is a directory"),
    ("t2i-compbench", write_geneval, "looks like JSON"),
    ("t2i-compbench", write_dpg, "is a directory"),
    ("dpg-bench", write_t2i, "is a file"),
    ("dpg-bench", write_geneval, "is a file"),
])
def test_wrong_prompt_format(tmp_path, no_model, capsys, bench, make, needle):
    assert run("--benchmark", bench, "--prompts", make(tmp_path), "--checkpoint", "tiny:",
               "--out", tmp_path / "o") == 2
    err = _err(capsys)
    assert err.startswith("ospo: error:") and needle in err
    assert not (tmp_path / "o").exists()


def test_bad_prompt_contents(tmp_path, no_model, capsys):
    g = tmp_path / "meta.jsonl"
    g.write_text(json.dumps({"prompt": "a photo of a cat"}) + "\n")
    assert run("--benchmark", "geneval", "--prompts", g, "--checkpoint", "tiny:", "--out", tmp_path / "o") == 2
    assert "'tag'" in _err(capsys)
    t = tmp_path / "spatial_val.txt"
    t.write_text("a cat on the left of a dog\na snake_case prompt\n")
    assert run("--benchmark", "t2i-compbench", "--prompts", t, "--checkpoint", "tiny:", "--out", tmp_path / "o") == 2
    assert "line 2" in _err(capsys)
    d = tmp_path / "empty_dir"
    d.mkdir()
    assert run("--benchmark", "dpg-bench", "--prompts", d, "--checkpoint", "tiny:", "--out", tmp_path / "o") == 2
    assert "no .txt" in _err(capsys)
    assert run("--benchmark", "geneval", "--prompts", tmp_path / "nope.jsonl", "--checkpoint", "tiny:",
               "--out", tmp_path / "o") == 2
    assert "does not exist" in _err(capsys)


def test_dpg_needs_four_or_one(tmp_path, no_model, capsys):
    assert run("--benchmark", "dpg-bench", "--prompts", write_dpg(tmp_path), "--checkpoint", "tiny:",
               "--out", tmp_path / "o", "--samples-per-prompt", "3") == 2
    assert "2x2" in _err(capsys)


@pytest.mark.parametrize("ckpt,needle", [
    ("runs/missing/checkpoint", "not found"),
    ("./nowhere", "not found"),
    ("not a model id", "not found"),
])
def test_missing_checkpoint(tmp_path, no_model, capsys, monkeypatch, ckpt, needle):
    monkeypatch.chdir(tmp_path)
    assert run("--benchmark", "geneval", "--prompts", write_geneval(tmp_path), "--checkpoint", ckpt,
               "--out", tmp_path / "o") == 2
    err = _err(capsys)
    assert needle in err and ckpt in err


def test_checkpoint_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert benchmarks.check_checkpoint("deepseek-community/Janus-Pro-1B") == "deepseek-community/Janus-Pro-1B"
    assert benchmarks.check_checkpoint("tiny:") == "tiny:"
    (tmp_path / "runs").mkdir()
    with pytest.raises(benchmarks.BenchmarkError, match="not found"):
        benchmarks.check_checkpoint("runs/ckpt")  # a local path that is missing, not a Hub id
    (tmp_path / "empty").mkdir()
    with pytest.raises(benchmarks.BenchmarkError, match="config.json"):
        benchmarks.check_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "config.json").write_text("{}")
    assert benchmarks.check_checkpoint(str(tmp_path / "ok")) == str(tmp_path / "ok")


def test_bad_numbers(tmp_path, no_model, capsys):
    p = write_geneval(tmp_path)
    for flag, val in [("--batch-size", "0"), ("--limit", "0"), ("--samples-per-prompt", "0"),
                      ("--guidance-scale", "1")]:
        assert run("--benchmark", "geneval", "--prompts", p, "--checkpoint", "tiny:", "--out",
                   tmp_path / "o", flag, val) == 2
        assert flag.lstrip("-") in _err(capsys)


def test_grid_2x2_order():
    ims = [Image.new("RGB", (4, 4), (10 * j, 0, 0)) for j in range(4)]
    g = benchmarks.grid_2x2(ims)
    assert g.size == (8, 8)
    assert [g.getpixel(xy)[0] for xy in [(0, 0), (4, 0), (0, 4), (4, 4)]] == [0, 10, 20, 30]


# --- integration: the real tiny Janus and ospo.sampling ----------------------------------

def _tiny_side(tiny_model_dir) -> int:
    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    grid = int(round(cfg["vision_config"]["num_image_tokens"] ** 0.5))
    levels = len(cfg["vq_config"]["channel_multiplier"])
    return grid * 2 ** (levels - 1)


@pytest.fixture
def real_sampling():
    return pytest.importorskip("ospo.sampling", reason="ospo.sampling (stage 3 sampler) not written yet")


@pytest.mark.parametrize("bench", ["geneval", "t2i-compbench", "dpg-bench"])
def test_tiny_model_end_to_end(tmp_path, tiny_model_dir, real_sampling, bench, monkeypatch):
    """One prompt, one sample (the sampler is slow on a shared CPU; the 2x2 grid and the
    counts per prompt are pinned by the stub tests above): the real model's images land
    under the scorer's names, at the model's image size."""
    side = _tiny_side(tiny_model_dir)
    out = tmp_path / "out"
    prompts = {"geneval": write_geneval, "t2i-compbench": write_t2i, "dpg-bench": write_dpg}[bench](tmp_path)
    args = ["--benchmark", bench, "--prompts", prompts, "--checkpoint", tiny_model_dir, "--out", out,
            "--samples-per-prompt", 1, "--limit", 1]
    assert run(*args) == 0
    expected = {"geneval": ["00000/metadata.jsonl", "00000/samples/0000.png"],
                "t2i-compbench": ["samples/a green bench and a blue bowl_000000.png"],
                "dpg-bench": ["images/1.png"]}[bench]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                     if p.is_file() and not p.name.startswith("evaluate"))
    assert written == expected
    assert png_size(out / expected[-1]) == (side, side)
    m = json.loads((out / "evaluate.manifest.json").read_text())
    assert m["finished"] and m["counts"]["done"] == 1 and m["checkpoint_resolved"]
    assert m["image_px"] == [side, side]
    # a rerun finds everything done and loads no model
    import ospo.engine

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ospo.engine.Engine, "load", classmethod(refuse))
    assert run(*args) == 0
