"""Trial: the presence curriculum moved into the tail of phase 1, where its learning rate has
fallen near phase 2's, and a phase 2 without presence stages whose rate decays over all its
full-mix steps.

    python docs/results/shapes-phase1-tail-curriculum-trial.py --vq-cache ~/.cache/ospo/vq \
        [--tail-start 1700] [--full-steps 1000] [--json OUT]

Phase 1 is the shipped recipe's (same model, pools, rows, schedule over ``Recipe.steps``)
until ``--tail-start``; from there its 40 yes/no rows per understanding step are drawn from
the curriculum (circle; circle, square; all three, equal thirds of the tail), as
:meth:`Batcher.curriculum_yes_no` draws them in phase 2. Phase 2 is
:func:`ospo.shapes.pretrain.train_yes_no` with no presence stages and ``--full-steps``
full-mix steps, the rate decaying linearly from ``yn_lr`` to 0 over all of them. The
shipped recipe spends 450 phase-2 steps on presence stages and 1,500 on the full mix (1,950
steps, 30.7 min); this would be 1,000 (about 16 min). Compare the held-out yes/no
(``eval``: the recipe's 400 questions, shipped 0.8225) and the phase-2 curve with the
shipped build's.

    ... --resume SNAPSHOT --stage-steps 150 --full-steps 1000

skips phase 1 (a ``--snapshot`` of an earlier run) and runs phase 2 with the recipe's
presence stages, then ``--full-steps`` full-mix steps decaying over ``--decay-steps``
(default: all of them), to see whether a longer decay makes up for fewer full-mix steps.
"""
import argparse, dataclasses, json, sys, time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ospo.shapes import pretrain as pt
from ospo.shapes import vq as vqm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from importlib import import_module

trial1 = import_module("shapes-phase1-curriculum-trial")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vq-cache", required=True)
    ap.add_argument("--tail-start", type=int, default=1700)
    ap.add_argument("--full-steps", type=int, default=1000)
    ap.add_argument("--snapshot", help="write the phase-1 model here (torch.save)")
    ap.add_argument("--resume", help="skip phase 1: load a --snapshot written by an earlier run")
    ap.add_argument("--stage-steps", type=int, default=0, help="phase 2's presence stages (the recipe: 150 each)")
    ap.add_argument("--decay-steps", type=int, help="phase 2's decay (default: all of --full-steps)")
    ap.add_argument("--json")
    ap.add_argument("--smoke", action="store_true", help="tiny pools and steps: checks the plumbing")
    a = ap.parse_args()

    recipe = pt.Recipe()
    n_eval = 200
    if a.smoke:
        recipe = dataclasses.replace(recipe, gen_pool=40, und_pool=200, steps=12, warmup=2, eval_every=4,
                                     eval_yes_no=16)
        n_eval = 16
    vq, model, engine = trial1.fresh_model(recipe, a.vq_cache, "/tmp/phase1-tail-trial")
    t_start = time.perf_counter()
    batcher = pt.Batcher(engine, model.model.vqmodel, recipe, progress=False)
    t_pool = time.perf_counter() - t_start
    sets = trial1.eval_sets(recipe, vq, n_eval)

    tail_und = (recipe.steps - a.tail_start + 1) // 2
    stage_recipe = dataclasses.replace(recipe, yn_stage_steps=-(-tail_und // 3), yn_rows=recipe.yes_no_rows)
    und_k = [0]
    plain_understanding = batcher.understanding

    tail_understanding = trial1.curriculum_understanding(batcher, engine, recipe, stage_recipe, und_k)

    # phase 1: train_lm's loop, the understanding rows switched at the tail
    for p in model.model.vqmodel.parameters():
        p.requires_grad_(False)
    params, opt = pt._optimizer(model, recipe, recipe.lr)
    curve1, t0 = [], time.perf_counter()
    if a.resume:
        snap = torch.load(a.resume, weights_only=True)
        model.load_state_dict(snap["model"])
        v, state, gauss = snap["rng"]
        batcher.rng.setstate((v, tuple(state), gauss))
    for step in range(0 if a.resume else recipe.steps):
        model.train()
        model.model.vqmodel.eval()
        for g in opt.param_groups:
            g["lr"] = pt.lr_at(step, recipe)
        tail = step >= a.tail_start
        gen = pt._generation_loss(model, engine, batcher, recipe)
        loss = recipe.w_gen * gen
        rec = {"step": step + 1, "gen": round(gen.item(), 4), "lr": round(pt.lr_at(step, recipe), 7)}
        if step % recipe.und_every == 0:
            if tail:
                shapes = pt.curriculum_shapes(und_k[0], stage_recipe)
                rec["shapes"] = len(shapes) if shapes else "all"
            u_rows, u_starts, recon, kinds = (tail_understanding if tail else plain_understanding)()
            n_yn = kinds.count("yes_no")
            pv = vqm.to_pixels(recon)
            yn = pt.lm_loss(model, u_rows[:n_yn], u_starts[:n_yn], engine.ids.pad, pv[:n_yn])
            cap = pt.lm_loss(model, u_rows[n_yn:], u_starts[n_yn:], engine.ids.pad, pv[n_yn:])
            loss = loss + recipe.w_yes_no * yn + recipe.w_caption * cap
            rec.update(yes_no=round(yn.item(), 4), caption=round(cap.item(), 4))
        txt = pt._text_loss(model, engine, batcher, recipe)
        loss = loss + recipe.w_text * txt
        rec["text"] = round(txt.item(), 4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        if (step + 1 >= a.tail_start and (step + 1 - a.tail_start) % 100 == 0) or step + 1 == recipe.steps \
                or (step + 1) % 500 == 0:
            for name, items in sets.items():
                rec[f"acc_{name}"] = pt.yes_no_eval(engine, items)["accuracy"]
            print("phase1", json.dumps(rec), flush=True)
        curve1.append(rec)
    t_p1 = time.perf_counter() - t0
    model.eval()
    if a.snapshot and not a.resume:
        torch.save({"model": model.state_dict(), "rng": batcher.rng.getstate()}, a.snapshot)

    # phase 2: no presence stages, the rate decaying over all full-mix steps
    pt.curriculum_shapes = (lambda step, r, _f=pt.curriculum_shapes: None if r.yn_stage_steps == 0 else _f(step, r))
    p2 = dataclasses.replace(recipe, yn_stage_steps=a.stage_steps, yn_full_steps=a.full_steps,
                             yn_decay_steps=a.decay_steps or a.full_steps)
    if a.smoke:
        p2 = dataclasses.replace(p2, yn_full_steps=4, yn_decay_steps=4)
    yn_stats = pt.train_yes_no(engine, model.model.vqmodel, p2, batcher, progress=False)
    t_final = time.perf_counter()
    ev = pt.yes_no_eval(engine, pt.yes_no_eval_set(recipe, recipe.eval_yes_no, model.model.vqmodel))
    final_sets = {name: pt.yes_no_eval(engine, items)["accuracy"] for name, items in sets.items()}
    out = {"what": __doc__.strip().splitlines()[0], "tail_start": a.tail_start, "full_steps": a.full_steps,
           "resumed": bool(a.resume), "phase2": {k: getattr(p2, k) for k in ("yn_stage_steps", "yn_full_steps", "yn_decay_steps")},
           "stage_und_steps": stage_recipe.yn_stage_steps,
           "seconds": {"pool": round(t_pool, 1), "phase1": round(t_p1, 1), "phase2": yn_stats["seconds"],
                       "eval": round(time.perf_counter() - t_final, 1)},
           "phase1_evals": [r for r in curve1 if "acc_circle" in r],
           "phase1_tail_yes_no_loss_per_50": [
               round(float(np.mean([r["yes_no"] for r in curve1[i:i + 50] if "yes_no" in r])), 4)
               for i in range(a.tail_start, len(curve1), 50)] if curve1 else None,
           "phase2_evals": [r for r in yn_stats["history"] if "yes_no_acc" in r],
           "phase2_yes_no_loss_per_50": [
               round(float(np.mean([r["yes_no"] for r in yn_stats["history"][i:i + 50]])), 4)
               for i in range(0, len(yn_stats["history"]), 50)],
           "eval": {"yes_no": ev, "sets": final_sets}}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("seconds", "eval", "phase1_tail_yes_no_loss_per_50")}))


if __name__ == "__main__":
    main()
