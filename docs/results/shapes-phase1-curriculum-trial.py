"""Trial: phase 1 with its yes/no rows drawn from the presence curriculum instead of the full
question mix (the recipe draws the full mix, whose loss stays at chance through all 2,500
phase-1 steps, and phase 2 then spends 450 steps growing presence questions one shape at a
time before the full mix starts to learn).

    python docs/results/shapes-phase1-curriculum-trial.py --vq-cache ~/.cache/ospo/vq \
        [--stage-und 150] [--stop 900] [--json OUT]

Everything else is the shipped recipe's phase 1 (same model, pools, rows, learning-rate
schedule over ``Recipe.steps``): only the 40 yes/no rows of each understanding step change.
Understanding step k asks presence questions about circles (k < stage), circles and squares
(k < 2 stage), all three shapes (k < 3 stage), then the full mix with ``yn_shape_frac`` of
presence questions, as phase 2's :meth:`Batcher.curriculum_yes_no` draws them. Every
``--eval-every`` steps it measures, on held-out VQ-reconstructed scenes, accuracy on
"Is there a circle?" and on presence questions about any shape (both balanced), and the
recipe's held-out yes/no set. The question is whether joint training learns presence when
it is asked in stages: if it does, phase 2 could skip its presence stages and start from a
model that already detects shapes.
"""
import argparse, dataclasses, json, random, sys, time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ospo.shapes import pretrain as pt
from ospo.shapes import vq as vqm
from ospo.shapes import world as w


def presence_eval_set(recipe, vq, shapes, n):
    from ospo.shapes import grammar as gr
    from ospo.shapes.evaluate import detect
    from ospo.shapes.world import Scene

    held = gr.heldout_records()
    rng = random.Random(f"phase1-curriculum-eval:{shapes}")
    imgs, qs = [], []
    i = 0
    while len(qs) < n:
        s = Scene.from_dict(held[i % len(held)]["scene"])
        img = w.render(w.sample_layout(s, rng))
        want = len(qs) % 2 == 0
        q = pt.presence_question(rng, detect(img), shapes, want)
        i += 1
        if q is None:
            continue
        imgs.append(img)
        qs.append((q, want))
    recon = pt.reconstruct(vq, np.stack(imgs))
    return [(r, q, t) for r, (q, t) in zip(recon, qs)]


def curriculum_understanding(batcher, engine, recipe, stage_recipe, und_k):
    """A stand-in for ``batcher.understanding``: the recipe's caption rows, with its yes/no rows
    drawn from the presence curriculum (:meth:`Batcher.curriculum_yes_no`) at understanding
    step ``und_k[0]`` (counted up by each call) of ``stage_recipe``'s stages."""
    from ospo.understanding import image_chat_ids

    tok = engine.tokenizer

    def understanding():
        shapes = pt.curriculum_shapes(und_k[0], stage_recipe)
        und_k[0] += 1
        b = batcher
        b.r = stage_recipe
        rows, starts, recon = b.curriculum_yes_no(shapes)
        b.r = recipe
        recon = list(recon)
        for _ in range(recipe.caption_rows):
            i = b.rng.randrange(recipe.und_pool)
            head = image_chat_ids(engine, pt.CAPTION_TEXT)
            ans = tok(" " + pt.gr.describe(pt.full_scene(b.und_layouts[i]), b.rng), add_special_tokens=False)["input_ids"]
            rows.append(head + ans + [engine.ids.eos])
            starts.append(len(head))
            recon.append(b.und_recon[i])
        kinds = ["yes_no"] * recipe.yes_no_rows + ["caption"] * recipe.caption_rows
        return rows, starts, np.stack(recon), kinds

    return understanding


def fresh_model(recipe, vq_cache, path: str):
    """The VQ, a freshly initialised model and its engine, set up as ``pt.build`` does (2
    threads, the recipe's seed, generation inputs initialised, the trained VQ loaded)."""
    from transformers import JanusForConditionalGeneration

    from ospo.engine import Engine
    from ospo.tiny import make_processor

    torch.set_num_threads(2)
    tok = pt.build_world_tokenizer(recipe)
    vq, _ = pt.train_or_load_vq(recipe, Path(vq_cache), False)
    torch.manual_seed(recipe.seed)
    config = pt.model_config(recipe, tok)
    model = JanusForConditionalGeneration(config)
    pt.init_generation_inputs(model)
    model.model.vqmodel.load_state_dict(vq.state_dict())
    model.model.vqmodel.eval()
    engine = Engine(model, make_processor(tok, config), path=path, device=torch.device("cpu"), dtype=torch.float32)
    return vq, model, engine


def eval_sets(recipe, vq, n: int) -> dict:
    """The held-out sets every evaluation scores: "Is there a circle?", presence of any
    shape (both balanced), and the recipe's yes/no mix."""
    return {"circle": presence_eval_set(recipe, vq, ("circle",), n),
            "presence": presence_eval_set(recipe, vq, tuple(w.SHAPES), n),
            "full": pt.yes_no_eval_set(recipe, n, vq)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vq-cache", required=True)
    ap.add_argument("--stage-und", type=int, default=150, help="understanding steps per presence stage")
    ap.add_argument("--stop", type=int, default=900, help="stop after this many phase-1 steps")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--json")
    ap.add_argument("--smoke", action="store_true", help="tiny pools and steps: checks the plumbing")
    a = ap.parse_args()

    recipe = pt.Recipe()
    n_eval = 200
    if a.smoke:
        recipe = dataclasses.replace(recipe, gen_pool=40, und_pool=200)
        n_eval = 16
    vq, model, engine = fresh_model(recipe, a.vq_cache, "/tmp/phase1-curriculum-trial")
    t_pool = time.perf_counter()
    batcher = pt.Batcher(engine, model.model.vqmodel, recipe, progress=False)
    t_pool = time.perf_counter() - t_pool
    sets = eval_sets(recipe, vq, n_eval)

    stage_recipe = dataclasses.replace(recipe, yn_stage_steps=a.stage_und, yn_rows=recipe.yes_no_rows)
    und_k = [0]
    understanding = curriculum_understanding(batcher, engine, recipe, stage_recipe, und_k)
    batcher.understanding = understanding
    curve = []
    model.train()
    params, opt = pt._optimizer(model, recipe, recipe.lr)
    t0 = time.perf_counter()
    for step in range(a.stop):
        model.train()
        model.model.vqmodel.eval()
        for g in opt.param_groups:
            g["lr"] = pt.lr_at(step, recipe)
        gen = pt._generation_loss(model, engine, batcher, recipe)
        loss = recipe.w_gen * gen
        rec = {"step": step + 1, "gen": round(gen.item(), 4)}
        if step % recipe.und_every == 0:
            shapes = pt.curriculum_shapes(und_k[0], stage_recipe)
            u_rows, u_starts, recon, kinds = batcher.understanding()
            n_yn = kinds.count("yes_no")
            pv = vqm.to_pixels(recon)
            yn = pt.lm_loss(model, u_rows[:n_yn], u_starts[:n_yn], engine.ids.pad, pv[:n_yn])
            cap = pt.lm_loss(model, u_rows[n_yn:], u_starts[n_yn:], engine.ids.pad, pv[n_yn:])
            loss = loss + recipe.w_yes_no * yn + recipe.w_caption * cap
            rec.update(yes_no=round(yn.item(), 4), caption=round(cap.item(), 4),
                       shapes=len(shapes) if shapes else "all")
        txt = pt._text_loss(model, engine, batcher, recipe)
        loss = loss + recipe.w_text * txt
        rec["text"] = round(txt.item(), 4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        if (step + 1) % a.eval_every == 0 or step + 1 == a.stop:
            for name, items in sets.items():
                rec[f"acc_{name}"] = pt.yes_no_eval(engine, items)["accuracy"]
            print(json.dumps(rec), flush=True)
        curve.append(rec)
    out = {"what": __doc__.strip().splitlines()[0], "stage_und": a.stage_und, "stop": a.stop,
           "pool_seconds": round(t_pool, 1), "seconds": round(time.perf_counter() - t0, 1),
           "eval_sets": {k: len(v) for k, v in sets.items()},
           "curve": [r for r in curve if "acc_circle" in r],
           "yes_no_loss_per_50": [round(float(np.mean([r["yes_no"] for r in curve[i:i + 50] if "yes_no" in r])), 4)
                                  for i in range(0, len(curve), 50)]}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "curve"}))


if __name__ == "__main__":
    main()
