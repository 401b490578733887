"""Trial: phase 2 with the vision encoder (and aligner) frozen and its features cached per
pooled image, from a phase-1 snapshot of the shipped recipe.

    python docs/results/shapes-frozen-vision-trial.py --phase1 ~/.cache/ospo/phase1 \
        --vq-cache ~/.cache/ospo/vq [--stop 1000] [--json OUT]

A phase-2 step spends 0.171 s of its 48 yes/no rows' 0.596 s in the vision encoder's forward
and backward (docs/results/shapes-step-breakdown-probe.json). Frozen, the encoder's output
for each of the ``und_pool`` images is computed once and looked up; nothing else changes
(the same rows drawn from the same stream, the same schedule, the held-out evaluation
through the real encoder every ``eval_every`` steps). The question is whether yes/no still
learns: compare ``yes_no_acc`` with the shipped build's phase-2 curve.
"""
import argparse, dataclasses, json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ospo.shapes import pretrain as pt
from ospo.shapes import vq as vqm
from ospo.shapes import world as w


class _Stop(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase1", required=True)
    ap.add_argument("--vq-cache", required=True)
    ap.add_argument("--stop", type=int, default=1000, help="stop after this many phase-2 steps")
    ap.add_argument("--json")
    ap.add_argument("--smoke", action="store_true", help="tiny pools and steps, a snapshot of the fresh model: checks the plumbing")
    a = ap.parse_args()

    from transformers import JanusForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from ospo.engine import Engine
    from ospo.tiny import make_processor

    recipe = pt.Recipe()
    if a.smoke:
        recipe = dataclasses.replace(recipe, gen_pool=40, und_pool=400, yn_stage_steps=2, yn_full_steps=6,
                                     yn_decay_steps=2, eval_every=4, eval_yes_no=16)
    torch.set_num_threads(2)
    tok = pt.build_world_tokenizer(recipe)
    vq, _ = pt.train_or_load_vq(recipe, Path(a.vq_cache), False)
    torch.manual_seed(recipe.seed)
    config = pt.model_config(recipe, tok)
    model = JanusForConditionalGeneration(config)
    model.model.vqmodel.load_state_dict(vq.state_dict())
    engine = Engine(model, make_processor(tok, config), path="/tmp/frozen-vision-trial",
                    device=torch.device("cpu"), dtype=torch.float32)
    batcher = pt.Batcher(engine, model.model.vqmodel, recipe, progress=False)
    if a.smoke:
        pt.save_phase1(Path(a.phase1) / "phase1.pt", recipe, model, batcher, {"seconds": 0, "history": []})
    pt.load_phase1(Path(a.phase1) / "phase1.pt", recipe, model, batcher)

    inner = model.model
    for mod in (inner.vision_model, inner.aligner):
        for p in mod.parameters():
            p.requires_grad_(False)
    t = time.perf_counter()
    original = inner.get_image_features
    with torch.no_grad():
        inner.vision_model.eval()
        feats = torch.cat([original(vqm.to_pixels(batcher.und_recon[i:i + 200])).pooler_output
                           for i in range(0, recipe.und_pool, 200)])
    cache_s = time.perf_counter() - t
    state = {"pick": None, "cache_hits": 0}

    def cached_features(pixel_values, **kw):
        if state["pick"] is None:     # the held-out evaluation: through the (frozen) encoder
            return original(pixel_values, **kw)
        out = BaseModelOutputWithPooling(pooler_output=feats[state["pick"]])
        state["pick"] = None
        state["cache_hits"] += 1
        return out

    inner.get_image_features = cached_features

    def curriculum_yes_no(shapes):
        # Batcher.curriculum_yes_no's draws, unchanged, with the pool indices kept for the cache.
        from ospo.understanding import query_ids

        b, r = batcher, batcher.r
        rows, starts, pick = [], [], []
        while len(rows) < r.yn_rows:
            i = b.rng.randrange(r.und_pool)
            want = b.rng.random() < 0.5
            if shapes is not None or b.rng.random() < r.yn_shape_frac:
                q = pt.presence_question(b.rng, b.und_dets[i], shapes or w.SHAPES, want)
                if q is None:
                    continue
            else:
                q, want, _ = pt.yes_no_question(b.rng, b.und_layouts[i].scene, b.und_dets[i], want)
            head = query_ids(b.e, q)
            rows.append(head + (b.yes if want else b.no) + [b.e.ids.eos])
            starts.append(len(head))
            pick.append(i)
        state["pick"] = torch.tensor(pick)
        return rows, starts, b.und_recon[pick]

    batcher.curriculum_yes_no = curriculum_yes_no
    hist, elapsed = [], []
    orig_eval = pt.yes_no_eval

    def logged_eval(engine_, items):
        res = orig_eval(engine_, items)
        hist.append(res["accuracy"])
        elapsed.append(round(time.perf_counter() - t, 1))
        print(f"[trial] held-out yes/no after {len(hist) * recipe.eval_every} steps: {res['accuracy']}", flush=True)
        if len(hist) * recipe.eval_every >= a.stop:
            raise _Stop
        return res

    pt.yes_no_eval = logged_eval
    t = time.perf_counter()
    try:
        pt.train_yes_no(engine, model.model.vqmodel, recipe, batcher, progress=True)
    except _Stop:
        pass
    secs = time.perf_counter() - t
    res = {"trial": "phase 2 with the vision encoder and aligner frozen, features cached per pooled image",
           "phase1_hash": pt.phase1_hash(recipe), "cache_seconds": round(cache_s, 1),
           "cache_hits": state["cache_hits"], "smoke": a.smoke,
           "steps": len(hist) * recipe.eval_every, "seconds_incl_evals": round(secs, 1),
           "eval_every": recipe.eval_every, "held_out_yes_no": hist, "seconds_at_each_eval": elapsed}
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
