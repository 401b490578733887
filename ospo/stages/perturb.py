"""Stage 2: N perturbations per prompt, each densified jointly with the prompt (OSPO sec. 3.4).

For prompt x and slot k = 0..N-1 the operation is fixed by the sub-category's schedule
(:func:`ospo.templates.schedule`): replace, swap or drop. The model writes x~_k; an
impossible operation (swap with fewer than two objects), an unchanged prompt, or an edit
that does not do what its operation says is rejected with a reason (see
:func:`ospo.parsing.check_perturbation`). Then the pair (x, x~_k) is densified in ONE
call so both dense prompts share the added scene and keep their difference; outputs that
lose an object of x or erase the difference are rejected. With ``perturb.densify: false``
(the paper's ablation, sec. 5.1.3) the dense prompts are the prompts themselves.

Users may supply variants (``perturb.input``): JSONL records ``{"id", "variants": [{"k"?,
"op", "perturbed", "dense"?, "perturbed_dense"?}, ...]}``; supplied slots are used as given
(dense prompts written by the model when missing), the other slots by the model.

Every item's seed derives from (run seed, id, k), never from its position, so results do
not depend on batch composition or on how ids are sharded.

Output ``variants.jsonl``: one record per prompt id with its N slots; slot k keeps its
index whatever happens to the others. The ledger rejects a prompt with no accepted slot.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ospo import parsing, templates
from ospo.rundir import StageError, derive_seed, read_jsonl, require_input

OUT = "variants.jsonl"


def run(cfg, rundir, iteration, get_engine, *, force=False, limit=None) -> dict:
    stage = rundir.stage(iteration, "perturb", cfg.stage_view("perturb"), force=force)
    supplied = read_user_variants(cfg.perturb.input, cfg.perturb.num_variants) if cfg.perturb.input else {}
    prompts = require_input(stage.dir / "prompts.jsonl", "prompts", "perturb")
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise StageError(f"perturb: {stage.dir / 'prompts.jsonl'} holds no prompts")
    n = cfg.perturb.num_variants
    per_group = max(1, cfg.perturb.batch_size // n)
    groups = list(stage.batches(prompts, per_group))
    with tqdm(groups, desc=f"perturb[{stage.rank}]", unit="batch", disable=not groups) as bar:
        for group in bar:
            records = _process(cfg, group, supplied, get_engine)
            ledger = [stage.ok(r["id"]) if any("rejected" not in v for v in r["variants"])
                      else stage.reject(r["id"], "no_accepted_variant") for r in records]
            stage.commit({OUT: records}, ledger)
    m = stage.finish(count_in=len(prompts), summarize=_summarize)
    if m["counts"]["out"] == 0:
        raise StageError(f"perturb: no prompt got an accepted variant (slot rejects: {m['extra']['slot_rejects']})")
    return m


def _summarize(stage) -> dict:
    slots = [v for r in read_jsonl(stage.merged[OUT]) for v in r["variants"]]
    return {"slot_rejects": dict(sorted(Counter(v["rejected"] for v in slots if "rejected" in v).items())),
            "slots_accepted": sum(1 for v in slots if "rejected" not in v)}


def read_user_variants(path: str, n: int) -> dict[str, dict[int, dict]]:
    """id -> k -> supplied slot. Clear errors for malformed files."""
    p = Path(path)
    if not p.exists():
        raise StageError(f"perturb.input: {p} does not exist")
    out: dict[str, dict[int, dict]] = {}
    for ln, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"perturb.input: {p} line {ln} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("variants"), list):
            raise StageError(f"perturb.input: {p} line {ln} needs 'id' and a list 'variants'")
        slots = {}
        for i, v in enumerate(rec["variants"]):
            k = v.get("k", i)
            if not isinstance(k, int) or not 0 <= k < n:
                raise StageError(f"perturb.input: {p} line {ln}: slot k={k!r} outside 0..{n - 1} (perturb.num_variants={n})")
            if not isinstance(v.get("perturbed"), str) or v.get("op") not in templates.OPERATIONS:
                raise StageError(f"perturb.input: {p} line {ln}: each variant needs 'perturbed' and an 'op' in "
                                 f"{sorted(templates.OPERATIONS)}")
            slots[k] = v
        out[str(rec["id"])] = slots
    return out


def _process(cfg, group: list[dict], supplied: dict, get_engine) -> list[dict]:
    """Fill the N slots of each prompt in the group: perturb, then densify, batched."""
    pc = cfg.perturb
    n = pc.num_variants
    slots: dict[tuple[str, int], dict] = {}
    ask_perturb: list[tuple[dict, int, str]] = []
    for p in group:
        ops = templates.schedule(p["sub_category"], n)
        for k, op in enumerate(ops):
            user = supplied.get(p["id"], {}).get(k)
            if user is not None:
                slot = {"k": k, "op": user["op"], "perturbed": parsing.clean_line(user["perturbed"]), "source": "user"}
                why = parsing.check_perturbation(p["prompt"], slot["perturbed"], user["op"])
                if why:
                    slots[(p["id"], k)] = {"k": k, "rejected": f"user_{why}"}
                    continue
                for key in ("dense", "perturbed_dense"):
                    if user.get(key):
                        slot[key] = parsing.clean_line(user[key])
                slots[(p["id"], k)] = slot
            elif op == "swap" and len(p["objects"]) < 2:
                # Swapping exchanges two objects or the attributes of two objects.
                slots[(p["id"], k)] = {"k": k, "rejected": "swap_impossible"}
            else:
                ask_perturb.append((p, k, op))

    if ask_perturb:
        eng = get_engine()
        outs = eng.generate_text(
            [templates.perturbation(op, p["prompt"]) for p, k, op in ask_perturb],
            seeds=[derive_seed(cfg.run.seed, "perturb", p["id"], k) for p, k, op in ask_perturb],
            prefix=templates.PERTURBED_PREFIX, max_new_tokens=pc.max_new_tokens, temperature=pc.temperature,
            top_p=pc.top_p, stop_newlines=1, batch_size=pc.batch_size)
        for (p, k, op), out in zip(ask_perturb, outs):
            text, why = parsing.parse_perturbation(out, p["prompt"], op)
            slots[(p["id"], k)] = ({"k": k, "rejected": why} if why else
                                   {"k": k, "op": op, "perturbed": text, "source": "model"})

    # Densify every accepted slot that has no dense prompts yet.
    by_id = {p["id"]: p for p in group}
    ask_dense = [(pid, k) for (pid, k), s in slots.items() if "rejected" not in s and "dense" not in s]
    if ask_dense and not pc.densify:
        for pid, k in ask_dense:
            s = slots[(pid, k)]
            s["dense"], s["perturbed_dense"] = by_id[pid]["prompt"], s["perturbed"]
    elif ask_dense:
        eng = get_engine()
        outs = eng.generate_text(
            [templates.densification(by_id[pid]["prompt"], slots[(pid, k)]["perturbed"]) for pid, k in ask_dense],
            seeds=[derive_seed(cfg.run.seed, "densify", pid, k) for pid, k in ask_dense],
            prefix=templates.DENSE_A_PREFIX, max_new_tokens=pc.max_new_tokens_dense, temperature=pc.temperature,
            top_p=pc.top_p, stop_newlines=2, batch_size=pc.batch_size)
        for (pid, k), out in zip(ask_dense, outs):
            p, s = by_id[pid], slots[(pid, k)]
            pair, why = parsing.parse_dense(out, p["prompt"], s["perturbed"], p["objects"])
            if why:
                slots[(pid, k)] = {"k": k, "rejected": why}
            else:
                s["dense"], s["perturbed_dense"] = pair
    # Supplied dense prompts are checked like the model's.
    for (pid, k), s in slots.items():
        if "rejected" not in s and s.get("source") == "user" and "dense" in s:
            why = parsing.check_dense(by_id[pid]["prompt"], s["perturbed"], s["dense"], s.get("perturbed_dense", ""),
                                      by_id[pid]["objects"])
            if why:
                slots[(pid, k)] = {"k": k, "rejected": f"user_{why}"}

    return [{"id": p["id"], "category": p["category"], "sub_category": p["sub_category"], "prompt": p["prompt"],
             "objects": p["objects"], "variants": [slots[(p["id"], k)] for k in range(n)]} for p in group]
