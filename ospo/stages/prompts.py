"""Stage 1: base prompts x per sub-category, each with its object nouns (OSPO sec. 3.3).

Two sources:

- The model (default). Per sub-category, in-context generation: our instruction plus
  ``num_shots`` examples asks for ``per_request`` prompts, each followed by its objects;
  ``samples_per_forward`` requests are sampled in one batched forward. Once a sub-category
  has ``refresh_every`` accepted prompts, its examples are drawn from accepted outputs
  (refreshed every ``refresh_every`` accepts) so the set does not collapse onto the seeds.
  Each candidate is parsed, validated (objects present as whole words) and deduplicated on
  normalized text; rejects are counted by reason.
- A user file (``prompts.input``): JSONL (``prompt``, optional ``objects``, ``id``,
  ``category``, ``sub_category``) or plain text, one prompt per line. Prompts without
  objects get them named by the model.

Resume: every request leaves ledger entries (accepted prompt ids, or rejects that carry
the request index), so a rerun continues with the next request index, counts are derived
from the ledger, and rejects are not redone.

Output ``prompts.jsonl``: ``id``, ``category``, ``sub_category``, ``prompt``, ``objects``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from tqdm import tqdm

from ospo import parsing, templates
from ospo.rundir import StageError, derive_seed, read_jsonl, write_jsonl_atomic

OUT = "prompts.jsonl"


def run(cfg, rundir, iteration, get_engine, *, force=False, limit=None) -> dict:
    stage = rundir.stage(iteration, "prompts", cfg.stage_view("prompts"), force=force)
    if cfg.prompts.input:
        rows = read_user_prompts(cfg.prompts.input)  # bad input fails before the model loads
        if limit is not None:
            rows = rows[:limit]
        _from_user(cfg, stage, rows, get_engine)
        count_in = len(rows)
    else:
        count_in = _from_model(cfg, stage, get_engine, limit)
    m = stage.finish(count_in=count_in, summarize=_dedupe_across_ranks)
    if m["counts"]["out"] == 0:
        raise StageError(f"prompts: no prompt was accepted (rejects: {m['rejects']}); see {stage.manifest_path}")
    return m


# --- user-supplied prompts ----------------------------------------------------------------

def read_user_prompts(path: str) -> list[dict]:
    """Read a JSONL or text file of prompts, with a clear error naming the problem."""
    p = Path(path)
    if not p.exists():
        raise StageError(f"prompts.input: {p} does not exist")
    rows: list[dict] = []
    lines = p.read_text(encoding="utf-8").splitlines()
    is_jsonl = p.suffix in (".jsonl", ".json") or (lines and lines[0].lstrip().startswith("{"))
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageError(f"prompts.input: {p} line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise StageError(f"prompts.input: {p} line {n} needs a string field 'prompt'")
            if "objects" in rec and not (isinstance(rec["objects"], list) and all(isinstance(o, str) for o in rec["objects"])):
                raise StageError(f"prompts.input: {p} line {n}: 'objects' must be a list of strings")
            sub = rec.get("sub_category")
            if sub is not None and sub not in templates.CATEGORY_OF:
                raise StageError(f"prompts.input: {p} line {n}: unknown sub_category {sub!r} "
                                 f"(known: {', '.join(templates.SUB_CATEGORIES)})")
        else:
            rec = {"prompt": line.strip()}
        rec.setdefault("id", f"user-{len(rows):06d}")
        rows.append(rec)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise StageError(f"prompts.input: {p} has duplicate ids")
    return rows


def _dedupe_across_ranks(stage) -> dict:
    """After the merge (rank 0): ranks wrote in parallel, so the same text may come from two
    of them. Keep its first record by id; turn the others into ``duplicate`` rejects."""
    recs = read_jsonl(stage.merged[OUT])
    seen, keep, dup = set(), [], set()
    for r in recs:
        key = parsing.normalize(r["prompt"])
        (dup.add(r["id"]) if key in seen else (seen.add(key), keep.append(r)))
    if dup:
        ledger = [stage.reject(e["id"], "duplicate", **{k: v for k, v in e.items() if k in ("sub", "request", "tag")})
                  if e["id"] in dup else e for e in read_jsonl(stage.merged_ledger)]
        write_jsonl_atomic(stage.merged[OUT], keep)
        write_jsonl_atomic(stage.merged_ledger, ledger)
        stage.done = {e["id"]: e for e in ledger}
    return {}


def _from_user(cfg, stage, rows: list[dict], get_engine) -> None:
    seen = {parsing.normalize(r["prompt"]) for r in stage.read(OUT)}
    todo = stage.mine([dict(r, id=str(r["id"])) for r in rows], cfg.prompts.samples_per_forward)
    need_objects = [r for r in todo if not r.get("objects")]
    named: dict[str, tuple[list[str] | None, str | None]] = {}
    if need_objects:
        eng = get_engine()
        texts = [templates.object_naming(parsing.clean_line(r["prompt"])) for r in need_objects]
        seeds = [derive_seed(cfg.run.seed, "objects", r["id"]) for r in need_objects]
        outs = eng.generate_text(texts, seeds=seeds, prefix=templates.OBJECTS_PREFIX, max_new_tokens=32,
                                 temperature=0.0, stop_newlines=1, batch_size=cfg.prompts.samples_per_forward)
        for r, out in zip(need_objects, outs):
            named[str(r["id"])] = parsing.parse_objects(out, parsing.clean_line(r["prompt"]),
                                                         max_objects=cfg.prompts.max_objects)
    for r in todo:
        rid = str(r["id"])
        prompt = parsing.clean_line(r["prompt"])
        if r.get("objects"):
            objects = list(r["objects"])
            why = parsing.validate_objects(prompt, objects, cfg.prompts.max_objects)
        else:
            objects, why = named[rid]
        if why is None and parsing.normalize(prompt) in seen:
            why = "duplicate"
        if why is not None:
            stage.commit(None, [stage.reject(rid, why)])
            continue
        seen.add(parsing.normalize(prompt))
        sub = r.get("sub_category") or "unspecified"
        rec = {"id": rid, "category": r.get("category") or templates.CATEGORY_OF.get(sub, "unspecified"),
               "sub_category": sub, "prompt": prompt, "objects": objects, "source": "user"}
        stage.commit({OUT: [rec]}, [stage.ok(rid)])


# --- model-written prompts ----------------------------------------------------------------

def quotas(total: int, subs: list[str]) -> dict[str, int]:
    base, extra = divmod(total, len(subs))
    return {s: base + (1 if i < extra else 0) for i, s in enumerate(subs)}


def seed_examples(cfg) -> dict[str, list[tuple[str, list[str]]]]:
    """The built-in seed examples, replaced per sub-category by ``prompts.seed_examples``."""
    seeds = dict(templates.SEED_EXAMPLES)
    if cfg.prompts.seed_examples:
        p = Path(cfg.prompts.seed_examples)
        if not p.exists():
            raise StageError(f"prompts.seed_examples: {p} does not exist")
        user: dict[str, list] = {}
        for n, rec in enumerate(read_user_prompts(str(p)), 1):
            sub, objs = rec.get("sub_category"), rec.get("objects")
            if sub is None or not objs:
                raise StageError(f"prompts.seed_examples: {p} record {n} needs 'sub_category' and 'objects'")
            why = parsing.validate_objects(rec["prompt"], objs, cfg.prompts.max_objects)
            if why:
                raise StageError(f"prompts.seed_examples: {p} record {n}: {why}")
            user.setdefault(sub, []).append((rec["prompt"], objs))
        seeds.update(user)
    return seeds


def few_shots(cfg, sub: str, accepted: list[tuple[str, list[str]]], request: int,
              seeds: dict | None = None) -> list[tuple[str, list[str]]]:
    """Seed examples until refresh_every prompts are accepted; then examples drawn from the
    accepted ones, redrawn each time another refresh_every are accepted."""
    k, every = cfg.prompts.num_shots, cfg.prompts.refresh_every
    if len(accepted) < every:
        return (seeds or templates.SEED_EXAMPLES)[sub][:k]
    block = len(accepted) // every
    pool = accepted[: block * every]
    rng = random.Random(derive_seed(cfg.run.seed, "shots", sub, block))
    return rng.sample(pool, min(k, len(pool)))


def _from_model(cfg, stage, get_engine, limit) -> int:
    pc = cfg.prompts
    total = min(pc.num_prompts, limit) if limit is not None else pc.num_prompts
    goal = quotas(total, pc.sub_categories)
    # Under a launcher each rank writes its share of what every sub-category still lacks
    # (balanced), with its own request stream and id tag; duplicates across ranks are
    # removed at merge time. One process: tag "" and the whole quota.
    tag = "" if stage.world == 1 else f"w{stage.world}r{stage.rank}-"
    seeds = seed_examples(cfg)
    start_recs = stage.read(OUT)  # merged records of earlier runs (leftover shards were folded in)
    seen = {parsing.normalize(r["prompt"]) for r in start_recs}
    context = {s: [(r["prompt"], r["objects"]) for r in start_recs if r["sub_category"] == s] for s in pc.sub_categories}
    have = {s: len(context[s]) for s in pc.sub_categories}
    quota = {s: quotas(max(0, goal[s] - have[s]), list(range(stage.world)))[stage.rank] for s in pc.sub_categories}
    budget = {s: math.ceil(quotas(goal[s], list(range(stage.world)))[stage.rank] * pc.max_requests_factor
                           / pc.per_request) for s in pc.sub_categories}
    next_request = {s: 0 for s in pc.sub_categories}
    next_id = {s: 0 for s in pc.sub_categories}
    for e in stage.done.values():
        if e.get("sub") in next_request and e.get("tag", "") == tag:
            next_request[e["sub"]] = max(next_request[e["sub"]], e.get("request", -1) + 1)
            next_id[e["sub"]] += e["status"] == "ok"
    unmet = {}
    bar = tqdm(total=sum(quota.values()), desc=f"prompts[{stage.rank}]", unit="prompt")
    for sub in pc.sub_categories:
        written = 0
        while written < quota[sub] and next_request[sub] < budget[sub]:
            eng = get_engine()
            reqs = list(range(next_request[sub], min(next_request[sub] + pc.samples_per_forward, budget[sub])))
            shots = few_shots(cfg, sub, context[sub], reqs[0], seeds)
            text = templates.prompt_writing(sub, shots, pc.per_request)
            outs = eng.generate_text([text] * len(reqs), seeds=[derive_seed(cfg.run.seed, "prompts", sub, tag, n) for n in reqs],
                                     prefix=templates.PROMPT_PREFIX, max_new_tokens=pc.max_new_tokens,
                                     temperature=pc.temperature, top_p=pc.top_p, batch_size=pc.samples_per_forward)
            for n, out in zip(reqs, outs):
                recs, ledger = [], []
                cands, reasons = parsing.parse_prompt_list(out, max_objects=pc.max_objects)
                info = {"sub": sub, "request": n, "tag": tag}
                for j, why in enumerate(reasons):
                    ledger.append(stage.reject(f"{sub}-{tag}r{n:06d}-x{j}", why, **info))
                for j, (prompt, objects) in enumerate(cands):
                    key = parsing.normalize(prompt)
                    if key in seen:
                        ledger.append(stage.reject(f"{sub}-{tag}r{n:06d}-c{j}", "duplicate", **info))
                    elif written >= quota[sub]:
                        ledger.append(stage.reject(f"{sub}-{tag}r{n:06d}-c{j}", "over_quota", **info))
                    else:
                        seen.add(key)
                        pid = f"{sub}-{tag}{next_id[sub]:06d}"
                        next_id[sub] += 1
                        written += 1
                        context[sub].append((prompt, objects))
                        recs.append({"id": pid, "category": templates.CATEGORY_OF[sub], "sub_category": sub,
                                     "prompt": prompt, "objects": objects, "source": "model"})
                        ledger.append(stage.ok(pid, **info))
                        bar.update(1)
                stage.commit({OUT: recs}, ledger)
            next_request[sub] = reqs[-1] + 1
        if written < quota[sub]:
            unmet[sub] = f"{have[sub] + written}/{goal[sub]}"
    bar.close()
    stage.extra["quota"] = goal
    stage.extra["quota_unmet"] = unmet
    if unmet:
        print(f"[prompts] quota not met after the request budget (prompts.max_requests_factor): {unmet}")
    return total
