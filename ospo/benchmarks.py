"""Benchmark prompt files and the output layouts their official scorers read.

Pure: no model, no torch. :mod:`ospo.evaluate` samples the images; this module knows

- how to read each benchmark's own prompt file (and to refuse a file in another format,
  with a message that names the problem, before any model is loaded);
- where each image goes, under which name, so that the benchmark's scorer finds it;
- how to write an item's images (atomically: a killed run never leaves a half PNG under
  a name a scorer reads).

Layouts, as read by the scorers (see docs/evaluate.md for the files they come from)::

    geneval        <out>/<00000>/metadata.jsonl      the prompt's line of evaluation_metadata.jsonl
                   <out>/<00000>/samples/<0000>.png  one file per sample
    t2i-compbench  <out>/samples/<prompt>_<NNNNNN>.png
                   NNNNNN = prompt_index * samples_per_prompt + sample (the scorers' question_id)
    dpg-bench      <out>/images/<prompt file stem>.png
                   4 samples: one 2x2 grid, tiles of the model's image size, no gaps,
                   samples 0..3 at top-left, top-right, bottom-left, bottom-right
                   (1 sample: that image alone)

Bookkeeping (ledger, manifest, temporary files) stays outside the directories the scorers
list, so the scorers never trip over it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

BENCHMARKS = ("geneval", "t2i-compbench", "dpg-bench")
TMP_DIR = ".tmp"


class BenchmarkError(Exception):
    """A prompt file or option that the chosen benchmark cannot use; the message names it."""


@dataclass
class Item:
    """One benchmark prompt. ``index`` is its position in the prompt file (0-based)."""

    index: int
    prompt: str
    key: str
    """Stable identity used in seeds and file names (GenEval: 00000, T2I: index, DPG: file stem)."""
    raw: str | None = None
    """GenEval: the prompt's metadata line exactly as read (written back as metadata.jsonl)."""
    meta: dict = field(default_factory=dict)


# --- helpers ----------------------------------------------------------------------------

def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise BenchmarkError(f"prompt file {path} does not exist")
    if path.is_dir():
        raise BenchmarkError(f"{path} is a directory; {what}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BenchmarkError(f"{path} is not UTF-8 text; {what}") from None


def _lines(text: str) -> list[str]:
    """Lines of a text file; trailing blank lines (a final newline) dropped."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _atomic_save_png(image, final: Path, tmp_dir: Path) -> None:
    """Save to a temporary file outside the scorer's directories, then rename into place."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{final.name}.{os.getpid()}.png"
    image.save(tmp, format="PNG")
    os.replace(tmp, final)


def _atomic_write_text(text: str, final: Path, tmp_dir: Path) -> None:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{final.name}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)


# --- the benchmarks ---------------------------------------------------------------------

class Benchmark:
    name: str = ""
    default_samples: int = 1
    prompts_hint: str = ""
    scorer: str = ""

    def read(self, path: str | os.PathLike) -> list[Item]:
        raise NotImplementedError

    def check_samples(self, n: int) -> None:
        if n < 1:
            raise BenchmarkError(f"--samples-per-prompt must be >= 1, got {n}")

    def files(self, item: Item, n: int) -> list[str]:
        """Paths (relative to the output directory) that an item's finished output consists of."""
        raise NotImplementedError

    def write(self, out: Path, item: Item, images: list, n: int) -> list[str]:
        """Write the item's images (one per sample, in sample order); returns :meth:`files`."""
        raise NotImplementedError

    def output_dirs(self, out: Path) -> list[Path]:
        """Directories this benchmark's layout owns under ``out`` (removed by --force)."""
        raise NotImplementedError

    def image_px(self, tile_px: int, n: int) -> tuple[int, int]:
        """(width, height) of each written PNG for model images of side ``tile_px``."""
        return tile_px, tile_px


class GenEval(Benchmark):
    """GenEval (djghosh13/geneval): prompts/evaluation_metadata.jsonl, one JSON object a line."""

    name = "geneval"
    default_samples = 4  # README "Image generation": 4 images per prompt
    prompts_hint = "GenEval wants prompts/evaluation_metadata.jsonl (one JSON object a line, with 'tag', 'include', 'prompt')"
    scorer = ("python evaluation/evaluate_images.py OUT --outfile RESULTS/results.jsonl "
              "--model-path OBJECT_DETECTOR_FOLDER && python evaluation/summary_scores.py RESULTS/results.jsonl")

    def read(self, path):
        path = Path(path)
        lines = _lines(_read_text(path, self.prompts_hint))
        if not lines:
            raise BenchmarkError(f"{path} holds no prompts; {self.prompts_hint}")
        items = []
        for i, line in enumerate(lines):
            where = f"{path}, line {i + 1}"
            if not line.strip():
                raise BenchmarkError(f"{where} is empty; GenEval's scorer maps folder N to line N, so no blank lines")
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise BenchmarkError(f"{where} is not JSON; {self.prompts_hint}") from None
            if not isinstance(rec, dict):
                raise BenchmarkError(f"{where} is not a JSON object; {self.prompts_hint}")
            missing = [k for k in ("prompt", "tag") if k not in rec]
            if missing:
                raise BenchmarkError(f"{where} has no {' / '.join(repr(k) for k in missing)}; {self.prompts_hint}")
            if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
                raise BenchmarkError(f"{where}: 'prompt' must be a non-empty string")
            if not isinstance(rec.get("include", []), list):
                raise BenchmarkError(f"{where}: 'include' must be a list")
            items.append(Item(index=i, prompt=rec["prompt"], key=f"{i:05d}", raw=line.strip(), meta=rec))
        return items

    def files(self, item, n):
        return [f"{item.key}/metadata.jsonl"] + [f"{item.key}/samples/{j:04d}.png" for j in range(n)]

    def write(self, out, item, images, n):
        out = Path(out)
        tmp = out / TMP_DIR
        for j, img in enumerate(images):
            _atomic_save_png(img, out / item.key / "samples" / f"{j:04d}.png", tmp)
        # evaluate_images.py json.load()s this file: the prompt's metadata line, verbatim.
        _atomic_write_text(item.raw + "\n", out / item.key / "metadata.jsonl", tmp)
        return self.files(item, n)

    def output_dirs(self, out):
        out = Path(out)
        if not out.is_dir():
            return []
        return [p for p in out.iterdir() if p.is_dir() and p.name.isdigit()]


class T2ICompBench(Benchmark):
    """T2I-CompBench / T2I-CompBench++ (Karine-Huang/T2I-CompBench): one category file
    (examples/dataset/<category>_val.txt), one prompt a line."""

    name = "t2i-compbench"
    default_samples = 10  # Readme "Inference": 10 images per prompt; 3_in_1.py hard-codes num=10
    prompts_hint = ("T2I-CompBench wants one category file such as examples/dataset/color_val.txt "
                    "(one prompt a line)")
    scorer = "see docs/evaluate.md (BLIP-VQA, UniDet, CLIPScore, 3-in-1 per category, --out_dir/--outpath OUT)"
    # Names over 255 bytes cannot be created on common file systems.
    _MAX_NAME = 255

    def read(self, path):
        path = Path(path)
        lines = _lines(_read_text(path, self.prompts_hint))
        if not lines:
            raise BenchmarkError(f"{path} holds no prompts; {self.prompts_hint}")
        first = lines[0].lstrip()
        if first.startswith("{") or first.startswith("["):
            raise BenchmarkError(f"{path} looks like JSON (GenEval metadata?); {self.prompts_hint}")
        items = []
        for i, line in enumerate(lines):
            where = f"{path}, line {i + 1}"
            # The benchmark's own generation script keeps the text before the first tab.
            prompt = line.split("\t")[0]
            if not prompt.strip():
                raise BenchmarkError(f"{where} is empty; the scorers number images by prompt line")
            # The scorers read the prompt back from the file name: prompt = name.split('_')[0].
            if "_" in prompt:
                raise BenchmarkError(f"{where}: the prompt contains '_', which the T2I-CompBench scorers "
                                     f"use to split the prompt from the image number: {prompt!r}")
            if "/" in prompt or "\0" in prompt:
                raise BenchmarkError(f"{where}: the prompt contains '/', which cannot be part of the "
                                     f"file name the scorers read the prompt from: {prompt!r}")
            if len(f"{prompt}_000000.png".encode()) > self._MAX_NAME:
                raise BenchmarkError(f"{where}: the prompt is too long to be a file name "
                                     f"({len(prompt.encode())} bytes)")
            items.append(Item(index=i, prompt=prompt, key=str(i)))
        return items

    @staticmethod
    def number(item: Item, j: int, n: int) -> int:
        """The scorers' question_id: images numbered in prompt order, n per prompt."""
        return item.index * n + j

    def files(self, item, n):
        return [f"samples/{item.prompt}_{self.number(item, j, n):06d}.png" for j in range(n)]

    def write(self, out, item, images, n):
        out = Path(out)
        rels = self.files(item, n)
        for rel, img in zip(rels, images):
            _atomic_save_png(img, out / rel, out / TMP_DIR)
        return rels

    def output_dirs(self, out):
        return [p for p in [Path(out) / "samples"] if p.is_dir()]


class DPGBench(Benchmark):
    """DPG-Bench (TencentQQGYLab/ELLA, dpg_bench/): a directory of <item_id>.txt prompt files."""

    name = "dpg-bench"
    default_samples = 4  # ELLA README: 4 images per prompt, as a 2x2 grid; dist_eval.sh PIC_NUM=4
    prompts_hint = "DPG-Bench wants the directory dpg_bench/prompts/ (one <id>.txt file per prompt)"
    scorer = "bash dpg_bench/dist_eval.sh OUT/images RESOLUTION"

    def read(self, path):
        path = Path(path)
        if not path.exists():
            raise BenchmarkError(f"prompt directory {path} does not exist")
        if not path.is_dir():
            raise BenchmarkError(f"{path} is a file; {self.prompts_hint}")
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")
        if not files:
            raise BenchmarkError(f"{path} holds no .txt prompt files; {self.prompts_hint}")
        # Numeric ids sort as numbers (1, 2, ..., 10), others by name after them.
        files.sort(key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem))
        items = []
        for i, f in enumerate(files):
            # compute_dpg_bench.py looks the image up by basename.split('.')[0].
            if "." in f.stem:
                raise BenchmarkError(f"{f}: the scorer keys images by the name before the first '.', "
                                     f"so a prompt file stem cannot contain '.'")
            try:
                prompt = f.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise BenchmarkError(f"{f} is not UTF-8 text; {self.prompts_hint}") from None
            if not prompt:
                raise BenchmarkError(f"{f} is empty")
            items.append(Item(index=i, prompt=prompt, key=f.stem))
        return items

    def check_samples(self, n):
        if n not in (1, 4):
            raise BenchmarkError(f"dpg-bench: --samples-per-prompt must be 4 (one 2x2 grid, the benchmark's "
                                 f"protocol, scored with PIC_NUM=4) or 1 (PIC_NUM=1), got {n}")

    def files(self, item, n):
        return [f"images/{item.key}.png"]

    def image_px(self, tile_px, n):
        side = tile_px * (2 if n == 4 else 1)
        return side, side

    def write(self, out, item, images, n):
        out = Path(out)
        (rel,) = self.files(item, n)
        _atomic_save_png(grid_2x2(images) if n == 4 else images[0], out / rel, out / TMP_DIR)
        return [rel]

    def output_dirs(self, out):
        return [p for p in [Path(out) / "images"] if p.is_dir()]


def grid_2x2(images: list):
    """Four equal-size images as one 2x2 grid without gaps: 0 1 / 2 3 (the crops
    compute_dpg_bench.py takes, in its order)."""
    from PIL import Image

    if len(images) != 4:
        raise ValueError(f"a 2x2 grid needs 4 images, got {len(images)}")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise ValueError("grid images differ in size")
    grid = Image.new("RGB", (2 * w, 2 * h))
    for j, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((j % 2) * w, (j // 2) * h))
    return grid


_REGISTRY = {b.name: b for b in (GenEval(), T2ICompBench(), DPGBench())}


def get(name: str) -> Benchmark:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}") from None


# --- checkpoints --------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_checkpoint(spec: str) -> str:
    """Refuse a checkpoint that cannot load, before loading anything.

    Accepted: ``tiny:`` (the test model), an existing directory with a config.json, or a
    string shaped like a Hub id (``owner/name``) that is not a local path."""
    if spec.startswith("tiny:"):
        return spec
    p = Path(spec)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise BenchmarkError(f"checkpoint directory {spec} has no config.json "
                                 f"(expected a save_pretrained Janus checkpoint)")
        return spec
    if p.exists():
        raise BenchmarkError(f"checkpoint {spec} is a file; pass the checkpoint directory or a Hub id")
    looks_local = spec.startswith((".", "/", "~")) or (
        "/" in spec and Path(spec.split("/")[0]).is_dir()
    )
    if _HUB_ID.match(spec) and not looks_local:
        return spec
    raise BenchmarkError(f"checkpoint {spec!r} not found: not an existing directory, not 'tiny:', "
                         f"and not a Hugging Face Hub id (owner/name)")
