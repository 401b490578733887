"""The run directory: the only contract between stages.

Layout (see README "Run directory")::

    <workdir>/config.yaml                 resolved config (schema_version inside)
    <workdir>/iter_XX/model.json          which model this iteration sampled with
    <workdir>/iter_XX/<stage outputs>.jsonl
    <workdir>/iter_XX/<stage>.done        resume ledger: one JSON line per finished id
    <workdir>/iter_XX/<stage>.manifest.json
    <workdir>/iter_XX/<stage>.stale       present when an earlier stage was redone

Guarantees a stage gets from :class:`StageRun`:

- Exactly once. Records are appended whole (write, flush, fsync) and the ids they
  finish are appended to the ledger after them. On start, a partial trailing line (a
  killed writer) is cut off, and records whose id is not in the ledger are dropped, so
  a crash between the two appends redoes that id instead of duplicating it.
- Counts are derived from the ledger (``{"id", "status": "ok"|"rejected", "reason"}``),
  never accumulated in memory, so a resumed stage does not double them.
- A changed config (the stage's view of it, hashed) is refused unless ``force``; with
  ``force`` the stage starts over and every later stage of the iteration is marked stale.

Paths inside records are relative to the work directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import jsonlines

from ospo.config import STAGES

# Which files each stage owns in an iteration directory.
STAGE_OUTPUTS: dict[str, list[str]] = {
    "prompts": ["prompts.jsonl"],
    "perturb": ["variants.jsonl"],
    "images": ["images.jsonl"],
    "vqa": ["vqa.jsonl", "pairs.jsonl"],
    "train": ["train_log.jsonl"],
}
STAGE_DIRS: dict[str, list[str]] = {"images": ["images"], "train": ["checkpoint", "train_state"]}


class StageError(RuntimeError):
    """A stage cannot run (bad input, changed config, nothing to do)."""


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from the run seed and an item's identity (never its position)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# --- JSONL and atomic files -------------------------------------------------------------

def read_jsonl(path: str | Path) -> list[dict]:
    """All complete records of a JSONL file ([] if absent). A partial last line is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    out = []
    with jsonlines.Reader(data.decode("utf-8").splitlines()) as reader:
        for rec in reader.iter(type=dict, skip_empty=True):
            out.append(rec)
    return out


def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Append whole lines, then flush and fsync: a killed process leaves no half record."""
    records = list(records)
    if not records:
        return
    with open(path, "a", encoding="utf-8") as fh:
        writer = jsonlines.Writer(fh, compact=True, sort_keys=False)
        writer.write_all(records)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> None:
    """Replace a JSONL file at once, in the same line format :func:`append_jsonl` writes."""
    buf = io.StringIO()
    with jsonlines.Writer(buf, compact=True, sort_keys=False) as writer:
        writer.write_all(records)
    atomic_write_text(path, buf.getvalue())


def _repair_tail(path: Path) -> None:
    """Cut a partial trailing line left by a killed writer."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        atomic_write_text(path, data[: data.rfind(b"\n") + 1].decode("utf-8"))


# --- The run directory ------------------------------------------------------------------

class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def iter_dir(self, i: int) -> Path:
        return self.root / f"iter_{i:02d}"

    def iterations(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name[5:]) for p in self.root.glob("iter_[0-9][0-9]*") if p.name[5:].isdigit())

    def is_finished(self, i: int) -> bool:
        m = self.iter_dir(i) / "train.manifest.json"
        return m.exists() and json.loads(m.read_text()).get("finished", False)

    def default_iteration(self) -> int:
        """The latest iteration not finished; a new one when all are."""
        its = self.iterations()
        if not its:
            return 0
        return its[-1] if not self.is_finished(its[-1]) else its[-1] + 1

    def rel(self, path: str | Path) -> str:
        return os.path.relpath(Path(path), self.root)

    def abs(self, rel: str) -> Path:
        return self.root / rel

    def stage(self, iteration: int, stage: str, view: dict, *, force: bool = False) -> "StageRun":
        return StageRun(self, iteration, stage, view, force=force)


class StageRun:
    """One stage in one iteration: its outputs, ledger, manifest and config check.

    Under a launcher (world > 1) each rank appends to its own shard files
    (``<output>.rankNNN``, ``<stage>.rankNNN.done``) and takes its share of the work in
    whole batches (:meth:`batches`); :meth:`finish` synchronizes and rank 0 merges the
    shards into the stage's files (ordered by id, exactly once), then every rank gets the
    merged manifest. Ids finished by any rank in any earlier run are done, so a rerun with
    another world size completes without duplicates. With one process there are no shards.
    """

    def __init__(self, rundir: RunDir, iteration: int, stage: str, view: dict, *, force: bool = False,
                 rank: int | None = None, world: int | None = None):
        from ospo import dist

        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        self.rundir = rundir
        self.iteration = iteration
        self.stage = stage
        self.rank = dist.rank() if rank is None else rank
        self.world = dist.world_size() if world is None else world
        self.dir = rundir.iter_dir(iteration)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.view = view
        self.hash = _hash(view)
        self.manifest_path = self.dir / f"{stage}.manifest.json"
        self.stale_path = self.dir / f"{stage}.stale"
        # Merged (final) files, read by the next stage.
        self.merged = {name: self.dir / name for name in STAGE_OUTPUTS[stage]}
        self.merged_ledger = self.dir / f"{stage}.done"
        # Files this process appends to.
        if self.world > 1:
            self.outputs = {name: self.dir / f"{name}.rank{self.rank:03d}" for name in self.merged}
            self.ledger_path = self.dir / f"{stage}.rank{self.rank:03d}.done"
        else:
            self.outputs = dict(self.merged)
            self.ledger_path = self.merged_ledger
        self._t0 = time.time()
        self._prev_seconds = 0.0
        self.extra: dict[str, Any] = {}
        self._begin(force)

    # -- start: config check, stale/force handling, crash repair --
    def _begin(self, force: bool) -> None:
        from ospo import dist

        manifest = self.read_manifest()
        if manifest is not None and not self.stale_path.exists() and manifest.get("config_hash") != self.hash and not force:
            changed = sorted(k for k in set(self.view) | set(manifest.get("config", {}))
                             if self.view.get(k) != manifest.get("config", {}).get(k))
            raise StageError(
                f"{self.stage}: the config changed since {self.dir.name} ran this stage "
                f"(changed: {', '.join(changed)}). Use --force to redo the stage "
                "(later stages of this iteration are then redone too), or another --workdir."
            )
        if self.rank == 0:
            if self.stale_path.exists():
                print(f"[{self.stage}] inputs were redone ({self.stale_path.read_text().strip()}): starting over")
                self.clear()
                self.stale_path.unlink()
                manifest = None
            elif force and (manifest is not None or any(p.exists() for p in self.merged.values())
                            or self._shard_files()):
                self.clear()
                manifest = None
                for s in STAGES[STAGES.index(self.stage) + 1:]:
                    if (self.dir / f"{s}.manifest.json").exists() or (self.dir / f"{s}.done").exists():
                        (self.dir / f"{s}.stale").write_text(f"{self.stage} was redone with --force\n")
            self._repair(self.merged, self.merged_ledger)
            # Shards left by a killed multi-process run: fold them in before anyone writes.
            for name, path in self.merged.items():
                for shard in self.dir.glob(f"{name}.rank[0-9][0-9][0-9]"):
                    ledger = shard.with_name(f"{self.stage}.{shard.name.rsplit('.', 1)[1]}.done")
                    self._repair({name: shard}, ledger)
            self.merge()
        dist.barrier()
        manifest = self.read_manifest()
        if manifest is not None:
            self._prev_seconds = float(manifest.get("seconds", 0.0))
            self.extra = dict(manifest.get("extra", {}))
        if self.world > 1:
            self._repair(self.outputs, self.ledger_path)
        self.done: dict[str, dict] = {}
        for path in [self.merged_ledger, *self._shard_ledgers()]:
            for e in read_jsonl(path):
                self.done.setdefault(e["id"], e)

    def _shard_ledgers(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.stage}.rank[0-9][0-9][0-9].done"))

    def _shard_files(self) -> list[Path]:
        return [p for name in self.merged for p in sorted(self.dir.glob(f"{name}.rank[0-9][0-9][0-9]"))] + self._shard_ledgers()

    def clear(self) -> None:
        import shutil

        for p in [*self.merged.values(), self.merged_ledger, self.manifest_path, *self._shard_files()]:
            p.unlink(missing_ok=True)
        for d in STAGE_DIRS.get(self.stage, []):
            if (self.dir / d).is_symlink():  # borrowed from another run (a branch): never touch its files
                (self.dir / d).unlink()
            else:
                shutil.rmtree(self.dir / d, ignore_errors=True)

    @staticmethod
    def _repair(outputs: dict[str, Path], ledger: Path) -> None:
        """Cut half lines; drop records whose id the ledger does not hold (exactly once)."""
        _repair_tail(ledger)
        ids = {e["id"] for e in read_jsonl(ledger)}
        for path in outputs.values():
            _repair_tail(path)
            recs = read_jsonl(path)
            kept = [r for r in recs if r.get("id") in ids]
            if len(kept) != len(recs):
                write_jsonl_atomic(path, kept)

    # -- the work --
    def is_done(self, item_id: str) -> bool:
        return item_id in self.done

    def todo(self, ids: Iterable[str]) -> list[str]:
        return [i for i in ids if i not in self.done]

    def batches(self, items: list, size: int, key=lambda x: x["id"]) -> Iterator[list]:
        """This rank's whole batches of ``items`` (batch b goes to rank b % world), done
        items dropped. Batches are cut from the full list, so a batch holds the same items
        whatever the number of ranks."""
        for b, start in enumerate(range(0, len(items), max(1, size))):
            if b % self.world != self.rank:
                continue
            batch = [x for x in items[start:start + size] if key(x) not in self.done]
            if batch:
                yield batch

    def mine(self, items: list, size: int, key=lambda x: x["id"]) -> list:
        """The not-done items of this rank's batches, flattened."""
        return [x for b in self.batches(items, size, key) for x in b]

    def read(self, name: str) -> list[dict]:
        """Records of an output visible to this rank: merged file plus this rank's shard."""
        recs = read_jsonl(self.merged[name])
        if self.world > 1:
            recs += read_jsonl(self.outputs[name])
        return recs

    def commit(self, records: dict[str, list[dict]] | None, ledger: list[dict]) -> None:
        """Append records (per output file name), then their ledger entries."""
        for e in ledger:
            if "status" not in e:
                raise ValueError("ledger entries need a status")
        for name, recs in (records or {}).items():
            append_jsonl(self.outputs[name], recs)
        append_jsonl(self.ledger_path, ledger)
        for e in ledger:
            self.done[e["id"]] = e
        if self.world == 1:
            self.write_manifest(finished=False)

    def ok(self, item_id: str, **extra) -> dict:
        return {"id": item_id, "status": "ok", **extra}

    def reject(self, item_id: str, reason: str, **extra) -> dict:
        return {"id": item_id, "status": "rejected", "reason": reason, **extra}

    # -- the manifest --
    def read_manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text())

    def counts(self) -> tuple[int, int, dict[str, int]]:
        ok = sum(1 for e in self.done.values() if e["status"] == "ok")
        rej = Counter(e.get("reason", "unknown") for e in self.done.values() if e["status"] != "ok")
        return ok, sum(rej.values()), dict(sorted(rej.items()))

    def write_manifest(self, *, finished: bool, count_in: int | None = None) -> dict:
        ok, rej, reasons = self.counts()
        old = self.read_manifest() or {}
        m = {
            "stage": self.stage,
            "iteration": self.iteration,
            "config_hash": self.hash,
            "config": self.view,
            "finished": finished,
            "counts": {"in": count_in if count_in is not None else old.get("counts", {}).get("in"),
                       "out": ok, "rejected": rej},
            "rejects": reasons,
            "seconds": round(self._prev_seconds + time.time() - self._t0, 3),
            "world_size": self.world,
            "extra": self.extra,
        }
        atomic_write_json(self.manifest_path, m)
        return m

    def merge(self) -> None:
        """Rank 0: fold every shard into the merged files, ordered by id, exactly once."""
        ledger: dict[str, dict] = {e["id"]: e for e in read_jsonl(self.merged_ledger)}
        shard_ledgers = self._shard_ledgers()
        if not shard_ledgers:
            return
        fresh: dict[str, dict] = {}
        for path in shard_ledgers:
            for e in read_jsonl(path):
                if e["id"] not in ledger:
                    fresh.setdefault(e["id"], e)
        for name, path in self.merged.items():
            recs = read_jsonl(path)
            for shard in sorted(self.dir.glob(f"{name}.rank[0-9][0-9][0-9]")):
                recs += [r for r in read_jsonl(shard) if r.get("id") in fresh]
            recs = _dedupe_records(recs)
            recs.sort(key=lambda r: str(r.get("id")))  # stable: a prompt's records keep their order
            write_jsonl_atomic(path, recs)
        merged = sorted({**ledger, **fresh}.values(), key=lambda e: str(e["id"]))
        write_jsonl_atomic(self.merged_ledger, merged)
        for p in self._shard_files():
            p.unlink(missing_ok=True)

    def _order_by_id(self) -> None:
        """Finished outputs are ordered by id (stable, so an id's records keep their order),
        whatever the number of ranks that wrote them: 1 and N processes give the same files."""
        for path in [*self.merged.values(), self.merged_ledger]:
            recs = read_jsonl(path)
            keys = [str(r.get("id")) for r in recs]
            if keys != sorted(keys):
                write_jsonl_atomic(path, sorted(recs, key=lambda r: str(r.get("id"))))

    def finish(self, count_in: int | None = None, summarize=None) -> dict:
        """Synchronize, merge shards (rank 0), write the final manifest; every rank returns it.

        ``summarize(stage)`` runs on rank 0 after the merge and returns extra manifest
        fields computed from the merged files.
        """
        from ospo import dist

        dist.barrier()
        if self.rank == 0:
            self.merge()
            self._order_by_id()
            self.done = {e["id"]: e for e in read_jsonl(self.merged_ledger)}
            if summarize is not None:
                self.extra.update(summarize(self))
            m = self.write_manifest(finished=True, count_in=count_in)
        dist.barrier()
        if self.rank != 0:
            m = self.read_manifest()
            self.done = {e["id"]: e for e in read_jsonl(self.merged_ledger)}
        return m


def _dedupe_records(recs: list[dict]) -> list[dict]:
    """Drop exact repeats (a crash between merge steps can leave a record twice)."""
    seen, out = set(), []
    for r in recs:
        key = json.dumps(r, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _hash(view: dict) -> str:
    from ospo.config import config_hash

    return config_hash(view)


def branch(src: str | Path, dst: str | Path, first_stage: str, view_of, iteration: int | None = None) -> dict:
    """Start run ``dst`` from run ``src``'s finished stages before ``first_stage``.

    For iteration i (default: the latest of ``src`` whose stage before ``first_stage`` is
    finished) the earlier stages' records, ledgers and manifests are copied into
    ``dst/iter_i`` and their file directories (``images/``) linked; earlier iterations are
    linked whole (their checkpoints seed iteration i). Nothing in ``src`` is written, ever:
    a stage that later redoes linked files replaces the link, not the files behind it.
    ``view_of(stage)`` gives the branch config's view of a stage; a reused stage whose view
    differs is refused, naming the keys, since its records were made with other settings.
    ``dst/branch.json`` records where the branch came from.
    """
    import shutil

    src, dst = Path(src).resolve(), Path(dst)
    if first_stage not in STAGES:
        raise StageError(f"--from: unknown stage {first_stage!r}")
    reused = list(STAGES[: STAGES.index(first_stage)])  # a list, as branch.json reads back
    if not (src / "config.yaml").exists():
        raise StageError(f"--from: {src} is not an ospo run directory (no config.yaml)")
    if dst.resolve() == src:
        raise StageError("--from: the branch needs its own --workdir")
    srd = RunDir(src)

    def finished(i: int, stage: str) -> bool:
        m = srd.iter_dir(i) / f"{stage}.manifest.json"
        return m.exists() and json.loads(m.read_text()).get("finished", False)

    if iteration is None:
        cands = [i for i in srd.iterations() if all(finished(i, s) for s in reused)]
        if not cands:
            raise StageError(f"--from: {src} has no iteration with {', '.join(reused) or 'a model'} finished")
        iteration = cands[-1]
    missing = [s for s in reused if not finished(iteration, s)]
    if missing:
        raise StageError(f"--from: {src}/iter_{iteration:02d} has not finished {', '.join(missing)}")
    for s in reused:
        old = json.loads((srd.iter_dir(iteration) / f"{s}.manifest.json").read_text()).get("config", {})
        new = view_of(s)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise StageError(f"--from: stage {s} is reused from {src} but the branch config changes it "
                             f"({', '.join(changed)}); branch from an earlier stage instead")
    record = {"from": str(src), "iteration": iteration, "first_stage": first_stage, "reused_stages": reused}
    info = dst / "branch.json"
    if info.exists():
        prev = json.loads(info.read_text())
        if {k: prev.get(k) for k in record} != record:
            raise StageError(f"--from: {dst} is already a branch of {prev.get('from')} at "
                             f"{prev.get('first_stage')}; use another --workdir")
        return prev
    dst.mkdir(parents=True, exist_ok=True)
    for j in range(iteration):
        if not (dst / f"iter_{j:02d}").exists():
            os.symlink(srd.iter_dir(j), dst / f"iter_{j:02d}")
    d = dst / f"iter_{iteration:02d}"
    d.mkdir(parents=True, exist_ok=True)
    sdir = srd.iter_dir(iteration)
    if (sdir / "model.json").exists():
        shutil.copy2(sdir / "model.json", d / "model.json")
    for s in reused:
        for name in [*STAGE_OUTPUTS[s], f"{s}.done", f"{s}.manifest.json"]:
            if (sdir / name).exists():
                shutil.copy2(sdir / name, d / name)
        for sub in STAGE_DIRS.get(s, []):
            if (sdir / sub).exists() and not (d / sub).exists():
                os.symlink(sdir / sub, d / sub)
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(info, record)
    return record


def require_input(path: Path, what: str, stage: str) -> list[dict]:
    """Read an upstream stage's records, with a clear error when they are missing."""
    if not path.exists():
        raise StageError(f"{stage}: {path} does not exist; run the {what} stage first")
    return read_jsonl(path)
