"""Stage 4: self-VQA decomposition, yes/no margin scoring, pair filtering and selection
(OSPO sec. 3.6).

Per prompt id (all images of the id in ``images.jsonl``, grouped in file order):

1. Questions. The model decomposes the ORIGINAL prompt x into atomic yes/no questions
   (:func:`ospo.templates.decomposition`, answer forced to start with the format label
   ``Q:``, seed ``derive_seed(run seed, "vqa", id)``), parsed by
   :func:`ospo.parsing.parse_questions` within ``[min_questions, max_questions]``. Only the
   leading block of ``Q:`` lines counts: a model that goes on to invent the next few-shot
   example ("Prompt: ...") does not add its questions. An unusable decomposition rejects
   the id with the parser's reason. Users may supply questions (``vqa.input``: JSONL
   ``{"id", "questions": [...]}``), checked the same way (each must end with "?", count
   bounds); a failing supplied entry rejects the id with ``user_<reason>``; ids absent
   from the file fall back to the model.
2. Scores. Every image of every complete pair k (both sides present) is asked every
   question (:func:`ospo.understanding.yes_no_probs`: batched; the vision encoder and the
   prefill over the image prefix run once per image, each question only its suffix):
   p(yes), p(no), s_j = p(yes) - p(no), S = mean_j s_j.
3. Filter and select (:mod:`ospo.selection`): rules ``min_chosen_score`` and
   ``drop_all_true_rejected``, then ``best`` / ``random`` / ``all``.

Outputs:

- ``vqa.jsonl``, one record per id (accepted or rejected): ``id``, ``category``,
  ``sub_category``, ``prompt``, ``questions`` (null when the decomposition failed),
  ``question_source`` (``user``/``model``; null when the id had no complete pair and was
  rejected before questions were asked), ``images`` (per image: ``k``, ``side``,
  ``image``, ``p_yes``, ``p_no``, ``s``, ``S``), ``pairs`` (per complete k: ``k``,
  ``S_chosen``, ``S_rejected``, ``rules`` (the rules that removed it, [] if none),
  ``status`` kept/filtered/not_selected), ``kept`` (list of k), ``incomplete`` (k's with one
  side only), and for rejects ``rejected`` (reason) and, for a model decomposition,
  ``decomposition`` (the raw text).
- ``pairs.jsonl``, one record per kept (id, k): ``id``, ``category``, ``sub_category``,
  ``prompt`` (the original x), ``k``, ``S_chosen``, ``S_rejected``, ``questions``, and
  ``chosen`` / ``rejected``: ``image``, ``tokens``, ``mask``, ``soft_maps``, ``seed``,
  ``prompt_fed`` copied from the images.jsonl records (tokens are never re-derived from
  PNGs).

Ledger: an id is ``ok`` when a pair was kept, else rejected with ``no_pair_survived``, a
decomposition reason, ``no_complete_pair`` or ``image_unreadable``. The manifest's
``extra`` holds pairs removed per rule (a pair failing both rules counts under each and
under ``both``), prompts survived, mean S of chosen/rejected images (all scored pairs and
kept pairs), mean questions per prompt and ``questions_per_s``: (image, question) rows
scored per second of scoring time (the decomposition's generation time is not in it).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ospo import parsing, selection, templates, understanding
from ospo.rundir import StageError, derive_seed, read_jsonl, require_input

VQA = "vqa.jsonl"
PAIRS = "pairs.jsonl"
COPY_KEYS = ("image", "tokens", "mask", "soft_maps", "seed", "prompt_fed")
SIDES = ("orig", "pert")


def run(cfg, rundir, iteration, get_engine, *, force=False, limit=None) -> dict:
    stage = rundir.stage(iteration, "vqa", cfg.stage_view("vqa"), force=force)
    vc = cfg.vqa
    supplied = read_user_questions(vc.input) if vc.input else {}  # bad file fails before the model loads
    groups = group_images(require_input(stage.dir / "images.jsonl", "images", "vqa"))
    if limit is not None:
        groups = groups[:limit]
    if not groups:
        raise StageError(f"vqa: {stage.dir / 'images.jsonl'} holds no images")
    # Whole batches of ids, cut from the full list (the same batches whatever the number of
    # ranks); about ``batch_size`` images per batch.
    per_batch = max(1, vc.batch_size // max(len(g["images"]) for g in groups))
    batches = list(stage.batches(groups, per_batch))
    with tqdm(batches, desc=f"vqa[{stage.rank}]", unit="batch", disable=not batches) as bar:
        for batch in bar:
            vqa_recs, pair_recs, ledger = _process(cfg, stage, rundir, batch, supplied, get_engine)
            stage.commit({VQA: vqa_recs, PAIRS: pair_recs}, ledger)
    m = stage.finish(count_in=len(groups), summarize=_summarize)
    if m["counts"]["out"] == 0:
        raise StageError(f"vqa: no prompt kept a pair (rejects: {m['rejects']}); see {stage.manifest_path}")
    return m


# --- input ----------------------------------------------------------------------------------

def group_images(records: list[dict]) -> list[dict]:
    """images.jsonl records grouped by prompt id, ids in order of first appearance.

    Returns ``[{"id", "category", "sub_category", "prompt", "images": [rec, ...]}]``;
    records marked ``rejected`` or without an image are left out.
    """
    by_id: dict[str, dict] = {}
    for r in records:
        if r.get("rejected") or not r.get("image"):
            continue
        g = by_id.get(r["id"])
        if g is None:
            g = by_id[r["id"]] = {"id": r["id"], "category": r.get("category"),
                                  "sub_category": r.get("sub_category"), "prompt": r["prompt"], "images": []}
        g["images"].append(r)
    return list(by_id.values())


def read_user_questions(path: str) -> dict[str, list]:
    """id -> supplied questions (as written). Malformed files raise StageError naming the line."""
    p = Path(path)
    if not p.exists():
        raise StageError(f"vqa.input: {p} does not exist")
    out: dict[str, list] = {}
    for ln, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"vqa.input: {p} line {ln} is not valid JSON ({e.msg})") from None
        qs = rec.get("questions") if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or "id" not in rec or not isinstance(qs, list) \
                or not all(isinstance(q, str) for q in qs):
            raise StageError(f"vqa.input: {p} line {ln} needs 'id' and 'questions' (a list of strings)")
        out[str(rec["id"])] = qs
    return out


def check_user_questions(qs: list[str], *, min_questions: int, max_questions: int):
    """(questions, None) or (None, reason): every question must end with '?', then the same
    parser as the model's output (dedupe, count bounds)."""
    qs = [" ".join(q.split()) for q in qs]
    if any(not q.endswith("?") for q in qs):
        return None, "not_a_question"
    return parsing.parse_questions("\n".join(f"{templates.QUESTION_PREFIX} {q}" for q in qs),
                                   min_questions=min_questions, max_questions=max_questions)


def leading_questions(text: str) -> str:
    """The leading block of ``Q:`` lines of a decomposition (blank lines allowed); stops at
    the first other line, e.g. an invented ``Prompt:`` of a next example."""
    keep = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.strip().lower().startswith(templates.QUESTION_PREFIX.lower()):
            break
        keep.append(line)
    return "\n".join(keep)


# --- the work -------------------------------------------------------------------------------

def _questions(cfg, batch, supplied, get_engine) -> dict[str, dict]:
    """id -> {"questions", "source"} or {"rejected", "source", ("decomposition")}."""
    vc = cfg.vqa
    out: dict[str, dict] = {}
    ask = []
    for g in batch:
        if g["id"] in supplied:
            qs, why = check_user_questions(supplied[g["id"]], min_questions=vc.min_questions,
                                           max_questions=vc.max_questions)
            out[g["id"]] = {"source": "user", **({"rejected": f"user_{why}"} if why else {"questions": qs})}
        else:
            ask.append(g)
    if ask:
        eng = get_engine()
        texts = eng.generate_text(
            [templates.decomposition(g["prompt"]) for g in ask],
            seeds=[derive_seed(cfg.run.seed, "vqa", g["id"]) for g in ask],
            prefix=templates.QUESTION_PREFIX, max_new_tokens=vc.max_new_tokens, temperature=vc.temperature,
            stop_newlines=vc.max_questions + 1, batch_size=vc.batch_size)
        for g, text in zip(ask, texts):
            qs, why = parsing.parse_questions(leading_questions(text), min_questions=vc.min_questions,
                                              max_questions=vc.max_questions)
            out[g["id"]] = ({"source": "model", "rejected": why, "decomposition": text} if why else
                            {"source": "model", "questions": qs})
    return out


def _pairs_of(g: dict) -> tuple[dict[int, dict[str, dict]], list[int]]:
    """k -> side -> images.jsonl record for complete pairs; and the incomplete k's."""
    by_k: dict[int, dict[str, dict]] = {}
    for r in g["images"]:
        by_k.setdefault(int(r["k"]), {})[r["side"]] = r
    complete = {k: v for k, v in sorted(by_k.items()) if all(s in v for s in SIDES)}
    return complete, sorted(k for k in by_k if k not in complete)


def _process(cfg, stage, rundir, batch, supplied, get_engine):
    vc = cfg.vqa
    # ids without a complete pair are rejected before anything is asked of the model
    qinfo = {g["id"]: {"source": None, "rejected": "no_complete_pair"} for g in batch if not _pairs_of(g)[0]}
    qinfo.update(_questions(cfg, [g for g in batch if g["id"] not in qinfo], supplied, get_engine))
    vqa_recs: dict[str, dict] = {}
    ledger: dict[str, dict] = {}
    to_score: list[tuple[dict, dict, list]] = []  # (group, complete pairs, pil images)
    for g in batch:
        info = qinfo[g["id"]]
        complete, incomplete = _pairs_of(g)
        rec = {"id": g["id"], "category": g["category"], "sub_category": g["sub_category"], "prompt": g["prompt"],
               "questions": info.get("questions"), "question_source": info["source"]}
        if incomplete:
            rec["incomplete"] = incomplete
        why = info.get("rejected")
        pil = None
        if why is None:
            try:
                pil = {(k, s): understanding.load_image(rundir.abs(v[s]["image"])) for k, v in complete.items()
                       for s in SIDES}
            except (OSError, ValueError):
                why = "image_unreadable"
        if why is not None:
            rec["rejected"] = why
            if "decomposition" in info:
                rec["decomposition"] = info["decomposition"]
            vqa_recs[g["id"]] = rec
            ledger[g["id"]] = stage.reject(g["id"], why)
            continue
        vqa_recs[g["id"]] = rec
        to_score.append((g, complete, pil))

    pair_recs: list[dict] = []
    if to_score:
        eng = get_engine()
        keys = [(g["id"], k, s) for g, complete, _ in to_score for k in complete for s in SIDES]
        images = [pil[(k, s)] for g, complete, pil in to_score for k in complete for s in SIDES]
        qs_of = {g["id"]: vqa_recs[g["id"]]["questions"] for g, _, _ in to_score}
        questions = [qs_of[i] for i, _, _ in keys]
        t0 = time.perf_counter()
        scores = understanding.yes_no_probs(eng, images, questions, batch_size=vc.batch_size)
        seconds = time.perf_counter() - t0
        sc = stage.extra.setdefault("scoring", {"rows": 0, "images": 0, "seconds": 0.0})
        sc["rows"] += sum(len(q) for q in questions)
        sc["images"] += len(images)
        sc["seconds"] = round(sc["seconds"] + seconds, 4)
        by_key = dict(zip(keys, scores))
        for g, complete, _ in to_score:
            rec = vqa_recs[g["id"]]
            rec["images"] = []
            cands = []
            for k, sides in complete.items():
                for s in SIDES:
                    sco = by_key[(g["id"], k, s)]
                    rec["images"].append({"k": k, "side": s, "image": sides[s]["image"], "p_yes": sco.p_yes,
                                          "p_no": sco.p_no, "s": sco.s, "S": sco.S})
                cands.append(selection.PairScores(k=k, S_chosen=by_key[(g["id"], k, "orig")].S,
                                                  s_rejected=by_key[(g["id"], k, "pert")].s))
            sel = selection.select_with_config(cands, vc, seed=derive_seed(cfg.run.seed, "select", g["id"]))
            rec["pairs"] = [{"k": c.k, "S_chosen": c.S_chosen, "S_rejected": by_key[(g["id"], c.k, "pert")].S,
                             "rules": sel.removed.get(c.k, []), "status": sel.status(c.k)} for c in cands]
            rec["kept"] = sel.kept
            if not sel.kept:
                rec["rejected"] = "no_pair_survived"
                ledger[g["id"]] = stage.reject(g["id"], "no_pair_survived")
                continue
            ledger[g["id"]] = stage.ok(g["id"], kept=sel.kept)
            for k in sel.kept:
                sides = complete[k]
                pair_recs.append({
                    "id": g["id"], "category": g["category"], "sub_category": g["sub_category"],
                    "prompt": g["prompt"], "k": k,
                    "S_chosen": by_key[(g["id"], k, "orig")].S, "S_rejected": by_key[(g["id"], k, "pert")].S,
                    "questions": rec["questions"],
                    "chosen": {key: sides["orig"].get(key) for key in COPY_KEYS},
                    "rejected": {key: sides["pert"].get(key) for key in COPY_KEYS},
                })
    order = [g["id"] for g in batch]
    return [vqa_recs[i] for i in order], pair_recs, [ledger[i] for i in order]


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None


def _summarize(stage) -> dict:
    """Manifest extras, derived from the merged output file (a resumed or sharded run does
    not double them). The scoring throughput is the one this process (rank 0) measured."""
    recs = read_jsonl(stage.merged[VQA])
    pairs = [p for r in recs for p in r.get("pairs", [])]
    kept = [p for p in pairs if p["status"] == "kept"]
    with_q = [r for r in recs if r.get("questions")]
    sc = stage.extra.get("scoring", {"rows": 0, "images": 0, "seconds": 0.0})
    return {
        "pairs_scored": len(pairs),
        "pairs_removed_by_rule": selection.removal_counts(p["rules"] for p in pairs if p["rules"]),
        "pairs_not_selected": sum(1 for p in pairs if p["status"] == "not_selected"),
        "pairs_kept": len(kept),
        "prompts_survived": sum(1 for r in recs if r.get("kept")),
        "mean_S_chosen": _mean([p["S_chosen"] for p in pairs]),
        "mean_S_rejected": _mean([p["S_rejected"] for p in pairs]),
        "mean_S_chosen_kept": _mean([p["S_chosen"] for p in kept]),
        "mean_S_rejected_kept": _mean([p["S_rejected"] for p in kept]),
        "questions_per_prompt": _mean([len(r["questions"]) for r in with_q]),
        "question_source": dict(sorted(Counter(r["question_source"] for r in recs if r["question_source"]).items())),
        "questions_per_s": round(sc["rows"] / sc["seconds"], 2) if sc.get("seconds") else None,
        "scoring": sc,
    }
