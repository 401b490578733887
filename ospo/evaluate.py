"""Generate benchmark images in the layouts the official scorers read.

    python -m ospo.evaluate --benchmark {geneval,t2i-compbench,dpg-bench}
        --prompts PATH --checkpoint PATH_OR_ID --out DIR
        [--samples-per-prompt N] [--batch-size B] [--guidance-scale 5] [--temperature 1]
        [--seed 0] [--limit N] [--force] [--dtype auto] [--device auto]

Reads the benchmark's own prompt file (GenEval's evaluation_metadata.jsonl, one
T2I-CompBench category file such as color_val.txt, DPG-Bench's dpg_bench/prompts/
directory), samples with the checkpoint through the same engine and CFG sampler as stage 3,
and writes the images where the benchmark's scorer looks for them (layouts in
:mod:`ospo.benchmarks`; scorer commands in docs/evaluate.md).

- Seeds: sample j of the prompt with key K gets ``derive_seed(seed, "evaluate", benchmark,
  K, j)`` (K: GenEval folder number, T2I-CompBench line index, DPG-Bench file stem), so an
  image does not depend on the batch it was drawn in, the number of GPUs, or --limit.
- Resumable: each finished prompt is appended to a ledger (``evaluate.done``, one per rank
  under a launcher) after its files are in place; a rerun skips prompts whose ledger line
  and files both exist. The settings are recorded in ``evaluate.manifest.json``; a rerun
  with different settings is refused (``--force`` starts over).
- Sharded: under torchrun / accelerate, rank r takes the prompts with index % world == r.
- Bad input (prompt file in the wrong format, missing checkpoint, bad option) fails with
  ``ospo: error: ...`` and exit status 2 before any model is loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ospo import dist
from ospo.benchmarks import BENCHMARKS, TMP_DIR, Benchmark, BenchmarkError, Item, check_checkpoint, get
from ospo.rundir import append_jsonl, atomic_write_json, derive_seed, read_jsonl

MANIFEST = "evaluate.manifest.json"
SEED_RULE = 'derive_seed(seed, "evaluate", benchmark, prompt key, sample index)'
# Settings that change the images: a resumed run must use the same ones.
SETTING_KEYS = ("benchmark", "checkpoint", "prompts_sha256", "samples_per_prompt",
                "guidance_scale", "temperature", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ospo.evaluate",
                                description="Generate benchmark images for the official scorers.")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--prompts", required=True,
                   help="geneval: evaluation_metadata.jsonl; t2i-compbench: a category file such as "
                        "color_val.txt; dpg-bench: the dpg_bench/prompts directory")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, Hub id, or tiny:")
    p.add_argument("--out", required=True, help="output directory (the scorer's input; see docs/evaluate.md)")
    p.add_argument("--samples-per-prompt", type=int,
                   help="default per benchmark: geneval 4, t2i-compbench 10, dpg-bench 4 (2x2 grid)")
    p.add_argument("--batch-size", type=int, default=16, help="images per sampling batch (default 16)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="CFG weight (default 5, OSPO sec. 3.5)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--limit", type=int, help="only the first N prompts (quick runs)")
    p.add_argument("--force", action="store_true", help="start over if --out holds a run with other settings")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto: this rank's GPU if any, else CPU")
    return p.parse_args(argv)


# --- planning: everything that can fail before the model loads --------------------------

class Plan:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.bench: Benchmark = get(args.benchmark)
        self.n = args.samples_per_prompt if args.samples_per_prompt is not None else self.bench.default_samples
        self.bench.check_samples(self.n)
        if args.batch_size < 1:
            raise BenchmarkError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.limit is not None and args.limit < 1:
            raise BenchmarkError(f"--limit must be >= 1, got {args.limit}")
        if not args.guidance_scale > 1:  # the CFG sampler's domain (1 would disable guidance)
            raise BenchmarkError(f"--guidance-scale must be > 1, got {args.guidance_scale}")
        if args.temperature < 0:
            raise BenchmarkError(f"--temperature must be >= 0, got {args.temperature}")
        self.checkpoint = check_checkpoint(args.checkpoint)
        all_items = self.bench.read(args.prompts)
        self.prompts_sha256 = hashlib.sha256(
            json.dumps([[it.key, it.prompt] for it in all_items]).encode()).hexdigest()
        self.items: list[Item] = all_items[: args.limit] if args.limit else all_items
        self.total_prompts = len(all_items)
        self.out = Path(args.out)
        if self.out.exists() and not self.out.is_dir():
            raise BenchmarkError(f"--out {self.out} exists and is not a directory")
        self.settings = {
            "benchmark": self.bench.name,
            "checkpoint": self.checkpoint,
            "prompts_sha256": self.prompts_sha256,
            "samples_per_prompt": self.n,
            "guidance_scale": args.guidance_scale,
            "temperature": args.temperature,
            "seed": args.seed,
        }

    def previous_settings(self) -> dict | None:
        path = self.out / MANIFEST
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("settings")
        except (json.JSONDecodeError, OSError):
            return None

    def check_resume(self) -> bool:
        """True if --out holds a run with other settings (to clear with --force); error without it."""
        prev = self.previous_settings()
        if prev is None:
            return False
        changed = [k for k in SETTING_KEYS if prev.get(k) != self.settings[k]]
        if not changed:
            return False
        if not self.args.force:
            detail = ", ".join(f"{k}: {prev.get(k)!r} -> {self.settings[k]!r}" for k in changed)
            raise BenchmarkError(f"{self.out} holds a run with other settings ({detail}); "
                                 f"use another --out or pass --force to start over")
        return True

    def seeds(self, item: Item) -> list[int]:
        return [derive_seed(self.args.seed, "evaluate", self.bench.name, item.key, j) for j in range(self.n)]


# --- ledger -------------------------------------------------------------------------------

def ledger_path(out: Path) -> Path:
    world = dist.world_size()
    return out / ("evaluate.done" if world <= 1 else f"evaluate.rank{dist.rank()}.done")


def ledger_records(out: Path) -> list[dict]:
    recs: list[dict] = []
    for path in sorted(out.glob("evaluate*.done")):
        recs += read_jsonl(path)
    return recs


def finished(plan: Plan) -> set[int]:
    """Indices whose ledger line exists and whose files are all in place."""
    by_index = {it.index: it for it in plan.items}
    done = set()
    for rec in ledger_records(plan.out):
        it = by_index.get(rec.get("index"))
        if it is None or it.key != rec.get("key"):
            continue
        if all((plan.out / rel).exists() for rel in plan.bench.files(it, plan.n)):
            done.add(it.index)
    return done


def clear(plan: Plan) -> None:
    """--force: remove this layout's outputs and the ledgers (only what ospo writes)."""
    for d in plan.bench.output_dirs(plan.out):
        shutil.rmtree(d, ignore_errors=True)
    for path in plan.out.glob("evaluate*.done"):
        path.unlink()
    shutil.rmtree(plan.out / TMP_DIR, ignore_errors=True)


# --- manifest -----------------------------------------------------------------------------

def write_manifest(plan: Plan, *, finished_run: bool, seconds: float, done_before: int,
                   image_px=None, resolved_path: str | None = None) -> dict:
    done_now = len(finished(plan))
    m = {
        "settings": plan.settings,
        "checkpoint": plan.args.checkpoint,
        "checkpoint_resolved": resolved_path,
        "benchmark": plan.bench.name,
        "prompts": str(Path(plan.args.prompts).resolve()),
        "samples_per_prompt": plan.n,
        "guidance_scale": plan.args.guidance_scale,
        "temperature": plan.args.temperature,
        "seed": plan.args.seed,
        "seed_rule": SEED_RULE,
        "batch_size": plan.args.batch_size,
        "limit": plan.args.limit,
        "world_size": dist.world_size(),
        "image_px": image_px,
        "counts": {
            "prompts_in_file": plan.total_prompts,
            "prompts": len(plan.items),
            "done": done_now,
            "done_before_this_run": done_before,
            "generated_this_run": max(0, done_now - done_before),
            "images": done_now * plan.n,
        },
        "finished": finished_run and done_now == len(plan.items),
        "seconds": round(seconds, 2),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scorer": plan.bench.scorer,
    }
    prev = plan.out / MANIFEST
    if image_px is None and prev.exists():
        try:
            m["image_px"] = json.loads(prev.read_text(encoding="utf-8")).get("image_px")
        except (json.JSONDecodeError, OSError):
            pass
    atomic_write_json(prev, m)
    return m


# --- sampling -----------------------------------------------------------------------------

def _tokens(result) -> list[int]:
    toks = getattr(result, "tokens", result)
    return [int(t) for t in (toks.tolist() if hasattr(toks, "tolist") else toks)]


def generate(plan: Plan, engine, todo: list[Item], progress=None) -> tuple[int, list[int] | None]:
    """Sample, write and ledger every item of ``todo``; returns (items written, image px)."""
    from ospo import sampling

    n = plan.n
    per_call = max(1, plan.args.batch_size // n)  # prompts per sampler call; the sampler batches rows
    ledger = ledger_path(plan.out)
    written, px = 0, None
    for start in range(0, len(todo), per_call):
        group = todo[start:start + per_call]
        prompt_ids = engine.image_prompt_ids([it.prompt for it in group])
        ids, seeds = [], []
        for it, pid in zip(group, prompt_ids):
            ids += [pid] * n
            seeds += plan.seeds(it)
        results = sampling.sample_images(engine, ids, seeds, guidance_scale=plan.args.guidance_scale,
                                         temperature=plan.args.temperature, batch_size=plan.args.batch_size)
        images = sampling.decode_images(engine, [_tokens(r) for r in results], batch_size=plan.args.batch_size)
        for k, it in enumerate(group):
            imgs = images[k * n:(k + 1) * n]
            files = plan.bench.write(plan.out, it, imgs, n)
            append_jsonl(ledger, [{"index": it.index, "key": it.key, "prompt": it.prompt, "files": files}])
            written += 1
            if px is None:
                px = list(plan.bench.image_px(imgs[0].size[0], n))
        if progress is not None:
            progress.update(len(group) * n)
    return written, px


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    try:
        plan = Plan(args)
        restart = plan.check_resume()
    except BenchmarkError as e:
        print(f"ospo: error: {e}", file=sys.stderr)
        return 2

    dist.init()  # a no-op for one process; under torchrun/accelerate: join the group
    dist.barrier()  # every rank has read the previous manifest before rank 0 replaces it
    plan.out.mkdir(parents=True, exist_ok=True)
    if dist.is_main() and restart:
        clear(plan)
    dist.barrier()
    done = finished(plan)
    done_before = len(done)
    if dist.is_main():
        write_manifest(plan, finished_run=False, seconds=0.0, done_before=done_before)
    world, rank = dist.world_size(), dist.rank()
    todo = [it for it in plan.items if it.index % world == rank and it.index not in done]
    dist.barrier()

    px, resolved = None, None
    if todo:
        from tqdm import tqdm

        from ospo.config import ModelConfig
        from ospo.engine import Engine

        if dist.is_main():
            print(f"[evaluate] {plan.bench.name}: {len(plan.items)} prompts x {plan.n} samples, "
                  f"{done_before} done; loading {plan.checkpoint}", file=sys.stderr)
        try:
            engine = Engine.load(ModelConfig(path=plan.checkpoint, dtype=args.dtype, device=args.device))
        except (FileNotFoundError, OSError) as e:
            print(f"ospo: error: {e}", file=sys.stderr)
            return 2
        resolved = engine.path
        with tqdm(total=len(todo) * plan.n, desc=f"{plan.bench.name} images", unit="img",
                  disable=not dist.is_main()) as bar:
            _, px = generate(plan, engine, todo, progress=bar)
    dist.barrier()
    if dist.is_main():
        m = write_manifest(plan, finished_run=True, seconds=time.time() - t0, done_before=done_before,
                           image_px=px, resolved_path=resolved)
        c = m["counts"]
        print(f"[evaluate] {plan.bench.name}: {c['done']}/{c['prompts']} prompts done "
              f"({c['generated_this_run']} this run, {m['seconds']} s) -> {plan.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
