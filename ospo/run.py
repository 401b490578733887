"""Command line: parse flags, load the config, order the stages. Nothing else.

    python -m ospo.run --stage {all,prompts,perturb,images,vqa,train}
        [--config FILE] [--workdir DIR] [--iteration I] [--iterations K]
        [--limit N] [--force] [key=value ...]

``--stage all`` loads the model once and runs stages 1-5 for ``--iterations`` K
iterations (default ``run.iterations``), each iteration sampling with the model the
previous one trained: in memory when that iteration trained in this process (stage 5 hands
its model over), else loaded from ``iter_<i-1>/checkpoint`` (a resumed run, or ZeRO-3,
whose partitioned weights are dropped). ``iter_XX/model.json`` records the path and which
way it came. A stage that cannot run (e.g. an iteration that kept no pair) stops the loop
with exit code 2. A single stage runs in ``--iteration`` I, by default the latest
iteration not finished.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from ospo import config as config_mod
from ospo import dist
from ospo.config import STAGES, Config, ConfigError
from ospo.rundir import RunDir, StageError, branch, atomic_write_json, atomic_write_text

DEFAULT_CONFIG = "shapes.yaml"


def default_config_path() -> Path:
    """configs/<DEFAULT_CONFIG>, from the source tree or the installed package data."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "configs" / DEFAULT_CONFIG, here / "configs" / DEFAULT_CONFIG):
        if cand.exists():
            return cand
    raise ConfigError(f"cannot find the default config {DEFAULT_CONFIG}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ospo.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=["all", *STAGES])
    p.add_argument("--config", help=f"YAML config (default: configs/{DEFAULT_CONFIG})")
    p.add_argument("--workdir", help="run directory (default: runs/<run.name>)")
    p.add_argument("--iteration", type=int, help="iteration a single stage works in (default: latest not finished)")
    p.add_argument("--iterations", type=int, help="iterations for --stage all (default: run.iterations)")
    p.add_argument("--limit", type=int, help="cap the number of prompts (quick runs)")
    p.add_argument("--force", action="store_true", help="redo the stage(s) even if the config changed")
    p.add_argument("--from", dest="from_run", metavar="RUN_DIR",
                   help="branch: reuse RUN_DIR's finished stages before --stage (or --from-stage with "
                        "--stage all) and run the rest here; RUN_DIR is never modified")
    p.add_argument("--from-stage", choices=STAGES, help="with --stage all --from: the first stage to redo")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. perturb.num_variants=2")
    return p.parse_args(argv)


def load_config(args) -> Config:
    path = args.config or default_config_path()
    overrides = list(args.overrides)
    if args.iterations is not None:
        overrides.append(f"run.iterations={args.iterations}")
    return config_mod.load(path, overrides)


class _LazyEngine:
    """Loads the model on first use, once per process; stage 5 may swap in its result."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.engine = None
        self.source = cfg.model.path

    def __call__(self):
        if self.engine is None:
            from ospo.engine import Engine

            print(f"[ospo] loading model {self.source}")
            self.engine = Engine.load(self.cfg.model, path=self.source)
        return self.engine


def _record_model(rundir: RunDir, iteration: int, lazy: _LazyEngine, note: str) -> None:
    d = rundir.iter_dir(iteration)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "model.json"
    if dist.is_main() and not path.exists():
        atomic_write_json(path, {"path": lazy.source, "how": note})


def run_stage(stage: str, cfg: Config, rundir: RunDir, iteration: int, lazy: _LazyEngine, *, force: bool, limit):
    mod = importlib.import_module(f"ospo.stages.{stage}")
    return mod.run(cfg, rundir, iteration, lazy, force=force, limit=limit)


def _select_model(lazy: _LazyEngine, path: str, how: str) -> str:
    """Point the lazy engine at ``path``; keep the model in memory only when it IS that one.

    Stage 5 leaves the model it trained in ``lazy.engine`` with ``lazy.source`` set to its
    checkpoint; anything else in memory (the previous iteration's sampler, or nothing after
    a ZeRO-3 run, which drops its partitioned model) is (re)loaded from ``path``."""
    same = lazy.source is not None and _same_path(lazy.source, path)
    if lazy.engine is not None and same:
        how += ", in memory (trained in this process)"
    else:
        lazy.engine = None
        how += ", loaded from disk"
    lazy.source = path
    return how


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    return pa == pb or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def _model_for_iteration(rundir: RunDir, iteration: int, cfg: Config) -> tuple[str, str]:
    """Iteration i > 0 samples with iteration i-1's checkpoint."""
    if iteration == 0:
        return cfg.model.path, "config model.path"
    prev = rundir.iter_dir(iteration - 1) / "checkpoint"
    if not (prev / "config.json").exists():
        raise StageError(f"iteration {iteration} needs {prev} (train iteration {iteration - 1} first)")
    return str(prev), f"checkpoint of iter_{iteration - 1:02d}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args)
        dist.init()  # a no-op for one process; under torchrun/accelerate/deepspeed: join the group
        workdir = Path(args.workdir or Path("runs") / cfg.run.name)
        rundir = RunDir(workdir)
        if dist.is_main():
            workdir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(workdir / "config.yaml", config_mod.dump(cfg))
        dist.barrier()
        lazy = _LazyEngine(cfg)
        if args.from_run:
            first = args.from_stage if args.stage == "all" else args.stage
            if first is None:
                raise StageError("--from with --stage all needs --from-stage (the first stage to redo)")
            b = None
            if dist.is_main():
                b = branch(args.from_run, workdir, first, cfg.stage_view, args.iteration)
            b = dist.broadcast_object(b)
            args.iteration = b["iteration"]
            if dist.is_main():
                print(f"[ospo] branch of {b['from']} iter_{b['iteration']:02d}: reusing {', '.join(b['reused_stages']) or 'nothing'}")
        if args.stage == "all":
            start = args.iteration if args.iteration is not None else rundir.default_iteration()
            for it in range(start, start + cfg.run.iterations):
                path, how = _model_for_iteration(rundir, it, cfg)
                how = _select_model(lazy, path, how)
                _record_model(rundir, it, lazy, how)
                if dist.is_main():
                    print(f"[ospo] iter_{it:02d} samples with {path} ({how})")
                for stage in STAGES:
                    m = run_stage(stage, cfg, rundir, it, lazy, force=args.force, limit=args.limit)
                    _report(stage, it, m)
        else:
            it = args.iteration if args.iteration is not None else rundir.default_iteration()
            lazy.source, how = _model_for_iteration(rundir, it, cfg)
            _record_model(rundir, it, lazy, how)
            m = run_stage(args.stage, cfg, rundir, it, lazy, force=args.force, limit=args.limit)
            _report(args.stage, it, m)
    except (ConfigError, StageError, FileNotFoundError) as e:
        print(f"ospo: error: {e}", file=sys.stderr)
        return 2
    return 0


def _report(stage: str, iteration: int, manifest: dict) -> None:
    if not dist.is_main():
        return
    c = manifest.get("counts", {})
    print(f"[{stage}] iter_{iteration:02d}: in {c.get('in')}, out {c.get('out')}, "
          f"rejected {c.get('rejected')} {json.dumps(manifest.get('rejects', {}))} "
          f"({manifest.get('seconds')} s)")


if __name__ == "__main__":
    raise SystemExit(main())
