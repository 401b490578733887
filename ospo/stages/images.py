"""Stage 3: one image per dense prompt and per perturbed dense prompt, with object masks
captured while sampling (OSPO sec. 3.5).

For every prompt id of ``variants.jsonl`` with at least one accepted slot, and every accepted
slot k: side ``orig`` samples from ``dense`` (the candidate preferred image), side ``pert``
from ``perturbed_dense`` (the candidate non-preferred one). Rejected slots, and prompts whose
slots are all rejected, are skipped (counted in the manifest as ``prompts_skipped``).

Sampling (:func:`ospo.sampling.sample_images`): prompt ids from
:meth:`ospo.engine.Engine.image_prompt_ids` (the function stage 5 trains with), CFG weight
``images.guidance_scale``, temperature ``images.temperature``, about ``images.batch_size``
images per step (whole prompts per batch: ``max(1, batch_size // (2 N))`` prompts, N slots
each), seed ``derive_seed(run seed, "images", id, k, side)`` per image, independent of the
batch, so a resumed or resharded run samples the same image.

Masks (OSPO sec. 3.5.2): the objects are those of the ORIGINAL prompt x (``objects`` of the
variants record, else of prompts.jsonl), located as token spans in the ids the mask is computed
over (:func:`ospo.masks.find_object_spans`: whole words, case-insensitive, every occurrence).
Attention is averaged over layers ``[s, L - s)`` (``images.skip_layers``, clamped to the loaded
model; the layers used are recorded) and heads; per object, Otsu's threshold; the union over
objects is the mask. ``images.mask_source``:

- ``sampling`` (default): captured on the conditional rows while sampling, over the fed prompt;
- ``teacher_forced``: one forward over the original x (built by ``image_prompt_ids``, as stage 5
  builds it) plus the sampled tokens, with the same capture.

An object not found is skipped (``objects_missing`` in the record, counted); an image with no
object found gets an all-zero mask and ``mask_note: no_object_found``. With
``images.capture_masks: false`` nothing is captured and ``mask``/``soft_maps`` are null
(``mask_note: capture_off``).

Output ``images.jsonl``, one record per (id, k, side), in prompt order then k then side:
``id``, ``category``, ``sub_category``, ``k``, ``side`` (orig|pert), ``seed``, ``prompt`` (the
original x), ``prompt_fed`` (the text sampled from), ``image`` (PNG, path relative to the work
directory: ``iter_XX/images/<id>_k<k>_<side>.png``), ``input_ids`` (the unpadded ids the mask
was computed over, chat template applied, ending with ``<begin_of_image>``: the fed prompt's for
``sampling``, x's for ``teacher_forced``), ``tokens`` (inline list of the sampled visual token
ids: what stage 5 trains on; the PNG is never re-encoded), ``objects``, ``object_spans`` (per
object a list of ``[start, end)`` spans in ``input_ids``), ``objects_missing``, ``layers``,
``grid``, ``mask_source``, ``soft_maps`` (path of an ``.npz`` next to the PNG: ``maps`` float32
``(n_objects, grid, grid)`` in ``objects`` order, NaN for an object not found, plus ``objects``
and ``found``), ``mask`` (inline ``grid x grid`` list of 0/1) and ``mask_note`` (null, or why
objects are missing). Maps and masks are row-major in generation order.

Ledger: one entry per prompt id (all its images are committed together, after their files are
written), so a resumed run redoes a prompt whole or not at all. The manifest's ``extra`` holds
``images``, ``seconds_per_image`` (sampling + masks + decoding + writing, this process),
``objects_missing`` (object occurrences not found, by object word), ``images_no_object``,
``empty_masks``, ``prompts_skipped`` and ``layers``.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
from tqdm import tqdm

from ospo import masks, sampling
from ospo.attention import default_layers
from ospo.rundir import StageError, derive_seed, read_jsonl, require_input

OUT = "images.jsonl"
SIDES = (("orig", "dense"), ("pert", "perturbed_dense"))


def run(cfg, rundir, iteration, get_engine, *, force=False, limit=None) -> dict:
    stage = rundir.stage(iteration, "images", cfg.stage_view("images"), force=force)
    variants = require_input(stage.dir / "variants.jsonl", "perturb", "images")
    objects_of = _objects_from_prompts(stage.dir)
    prompts = []
    skipped = 0
    for r in variants:
        slots = [v for v in r.get("variants", []) if "rejected" not in v and v.get("dense") and v.get("perturbed_dense")]
        if not slots:
            skipped += 1
            continue
        objs = r.get("objects")
        if objs is None:
            objs = objects_of.get(r["id"], [])
        prompts.append({**r, "objects": list(objs), "slots": slots})
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise StageError(f"images: {stage.dir / 'variants.jsonl'} holds no prompt with an accepted variant")
    n_slots = max(len(p["slots"]) for p in prompts)
    per_batch = max(1, cfg.images.batch_size // (2 * n_slots))
    batches = list(stage.batches(prompts, per_batch))
    stage.extra["prompts_skipped"] = skipped
    with tqdm(batches, desc=f"images[{stage.rank}]", unit="batch", disable=not batches) as bar:
        for batch in bar:
            t0 = time.perf_counter()
            records = _process(cfg, stage, rundir, batch, get_engine())
            tm = stage.extra.setdefault("timing", {"images": 0, "seconds": 0.0})
            tm["images"] += len(records)
            tm["seconds"] = round(tm["seconds"] + time.perf_counter() - t0, 4)
            stage.commit({OUT: records}, [stage.ok(p["id"], images=sum(r["id"] == p["id"] for r in records))
                                          for p in batch])
    m = stage.finish(count_in=len(prompts), summarize=_summarize)
    if m["counts"]["out"] == 0:
        raise StageError(f"images: no image was sampled; see {stage.manifest_path}")
    return m


def _objects_from_prompts(it_dir) -> dict[str, list[str]]:
    p = it_dir / "prompts.jsonl"
    return {r["id"]: r.get("objects") or [] for r in read_jsonl(p)} if p.exists() else {}


def jobs_of(cfg, prompt: dict) -> list[dict]:
    """The images of one prompt record: one per (accepted k, side), with its seed."""
    return [{"id": prompt["id"], "k": int(v["k"]), "side": side, "text": v[key],
             "seed": derive_seed(cfg.run.seed, "images", prompt["id"], int(v["k"]), side)}
            for v in prompt["slots"] for side, key in SIDES]


def _process(cfg, stage, rundir, batch: list[dict], eng) -> list[dict]:
    ic = cfg.images
    layers = default_layers(eng.num_layers, ic.skip_layers)
    grid = eng.grid
    jobs = [(p, j) for p in batch for j in jobs_of(cfg, p)]
    fed_ids = eng.image_prompt_ids([j["text"] for _, j in jobs])
    capture = None
    if ic.capture_masks and ic.mask_source == "sampling":
        mask_ids = fed_ids
        spans = [masks.find_object_spans(ids, p["objects"], eng.tokenizer) for (p, _), ids in zip(jobs, fed_ids)]
        capture = sampling.CaptureSpec(layers=layers, spans=spans)
    results = sampling.sample_images(eng, fed_ids, [j["seed"] for _, j in jobs], guidance_scale=ic.guidance_scale,
                                     temperature=ic.temperature, batch_size=ic.batch_size, capture=capture)
    tokens = [r.tokens for r in results]
    if ic.capture_masks and ic.mask_source == "sampling":
        soft = [r.maps for r in results]
    elif ic.capture_masks:  # teacher_forced over the original prompt x
        x_ids = {p["id"]: ids for p, ids in zip(batch, eng.image_prompt_ids([p["prompt"] for p in batch]))}
        mask_ids = [x_ids[p["id"]] for p, _ in jobs]
        spans = [masks.find_object_spans(ids, p["objects"], eng.tokenizer) for (p, _), ids in zip(jobs, mask_ids)]
        soft = sampling.teacher_forced_maps(eng, mask_ids, tokens, spans, layers, batch_size=ic.batch_size)
    else:
        mask_ids, spans, soft = fed_ids, [[[] for _ in p["objects"]] for p, _ in jobs], [None] * len(jobs)
    pngs = sampling.decode_images(eng, tokens)

    out_dir = stage.dir / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for (p, j), ids, sp, maps, toks, png in zip(jobs, mask_ids, spans, soft, tokens, pngs):
        stem = f"{p['id']}_k{j['k']}_{j['side']}"
        png_path = out_dir / f"{stem}.png"
        png.save(png_path)
        rec = {"id": p["id"], "category": p.get("category"), "sub_category": p.get("sub_category"), "k": j["k"],
               "side": j["side"], "seed": j["seed"], "prompt": p["prompt"], "prompt_fed": j["text"],
               "image": rundir.rel(png_path), "input_ids": list(ids), "tokens": list(toks),
               "objects": p["objects"], "object_spans": sp, "layers": layers, "grid": grid,
               "mask_source": ic.mask_source if ic.capture_masks else None}
        if maps is None:
            rec.update(objects_missing=[], soft_maps=None, mask=None, mask_note="capture_off")
        else:
            grids = [None if m is None else np.asarray(m, dtype=np.float32).reshape(grid, grid) for m in maps]
            mask, note, missing = masks.image_mask(grids, p["objects"], grid)
            npz_path = out_dir / f"{stem}.npz"
            stacked = np.stack([np.full((grid, grid), np.nan, np.float32) if g is None else g for g in grids]) \
                if grids else np.zeros((0, grid, grid), np.float32)
            with open(npz_path, "wb") as fh:
                np.savez(fh, maps=stacked, objects=np.array(p["objects"], dtype=str),
                         found=np.array([g is not None for g in grids], dtype=bool))
            rec.update(objects_missing=missing, soft_maps=rundir.rel(npz_path), mask=mask.tolist(), mask_note=note)
        records.append(rec)
    return records


def _summarize(stage) -> dict:
    recs = read_jsonl(stage.merged[OUT])
    tm = stage.extra.get("timing", {"images": 0, "seconds": 0.0})
    missing = Counter(o for r in recs for o in r.get("objects_missing", []))
    return {
        "images": len(recs),
        "seconds_per_image": round(tm["seconds"] / tm["images"], 4) if tm.get("images") else None,
        "timing": tm,
        "objects_missing": dict(sorted(missing.items())),
        "objects_missing_total": sum(missing.values()),
        "images_no_object": sum(1 for r in recs if r.get("mask_note") == masks.NO_OBJECT_FOUND),
        "empty_masks": sum(1 for r in recs if r.get("mask") is not None and not any(any(row) for row in r["mask"])),
        "prompts_skipped": stage.extra.get("prompts_skipped", 0),
        "layers": recs[0]["layers"] if recs else None,
    }
