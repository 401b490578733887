"""One-off diagnostic (2026-12-03), kept as the record of how docs/results/shapes-relation-stage.json
was measured; not part of the package and not run by the tests.

Can a relation stage of the yes/no curriculum teach the shipped ShapesWorld model relation
questions? Fine-tunes the shipped checkpoint in memory (nothing is saved): each step 48
yes/no rows, REL_FRAC of them relation questions (balanced yes/no, drawn by
``pretrain.yes_no_question`` until one of kind "relation" comes), the rest phase 2's full mix
(25% presence); generation rows every 2nd step and text rows every step, AdamW at the
recipe's yn_lr, as phase 2 does. Every 100 steps: held-out accuracy on 200 relation questions
and on 200 questions of the full mix (held-out scenes, VQ reconstructions, as the recipe's
own evaluation).

    python docs/results/shapes-relation-stage.py STEPS REL_FRAC OUT.json
"""
import dataclasses, json, random, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np, torch
torch.set_num_threads(2)
from ospo.engine import Engine
from ospo.shapes import pretrain as pt, world as w, grammar as gr
from ospo.shapes.grammar import Scene
from ospo.shapes.evaluate import detect
from ospo.understanding import query_ids
from ospo.shapes import vq as vqm

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 400
REL_FRAC = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
OUT = sys.argv[3] if len(sys.argv) > 3 else f"relstage-{STEPS}-{REL_FRAC}.json"
out = {"steps": STEPS, "rel_frac": REL_FRAC, "history": []}
eng = Engine.load(path=str(pt.packaged_checkpoint()))
vq = eng.model.model.vqmodel
r = dataclasses.replace(pt.Recipe(), gen_pool=1500, und_pool=3000)
t0 = time.time()
b = pt.Batcher(eng, vq, r, seed_tag="relstage", progress=False)
print("pool", round(time.time() - t0), "s", file=sys.stderr)

def question_of_kind(rng, scene, dets, want, kind, tries=40):
    for _ in range(tries):
        q, t, k = pt.yes_no_question(rng, scene, dets, want)
        if k == kind and t == want:
            return q
    return None

def eval_set(n, kind):
    held = gr.heldout_records()
    rng = random.Random(f"relstage-eval:{kind}")
    imgs, qs = [], []
    i = 0
    while len(qs) < n and i < 20 * n:
        rec = held[i % len(held)]; i += 1
        s = Scene.from_dict(rec["scene"])
        img = w.render(w.sample_layout(s, rng))
        want = len(qs) % 2 == 0
        if kind is None:
            q, t, _ = pt.yes_no_question(rng, s, detect(img), want)
        else:
            q, t = question_of_kind(rng, s, detect(img), want, kind), want
            if q is None:
                continue
        imgs.append(img); qs.append((q, t))
    recon = pt.reconstruct(vq, np.stack(imgs))
    return [(x, q, t) for x, (q, t) in zip(recon, qs)]

ev_rel, ev_mix = eval_set(200, "relation"), eval_set(200, None)
def evaluate(step):
    rec = {"step": step, "relation": pt.yes_no_eval(eng, ev_rel), "mix": pt.yes_no_eval(eng, ev_mix)}
    out["history"].append(rec)
    json.dump(out, open(OUT, "w"), indent=1)
    print(json.dumps(rec), file=sys.stderr, flush=True)
evaluate(0)

rng = random.Random("relstage-train")
def rows_batch():
    rows, starts, pick = [], [], []
    while len(rows) < r.yn_rows:
        i = rng.randrange(r.und_pool)
        want = rng.random() < 0.5
        lay = b.und_layouts[i]
        if rng.random() < REL_FRAC:
            q = question_of_kind(rng, lay.scene, b.und_dets[i], want, "relation")
            if q is None:
                continue
        elif rng.random() < r.yn_shape_frac:
            q = pt.presence_question(rng, b.und_dets[i], w.SHAPES, want)
            if q is None:
                continue
        else:
            q, want, _ = pt.yes_no_question(rng, lay.scene, b.und_dets[i], want)
        head = query_ids(eng, q)
        rows.append(head + (b.yes if want else b.no) + [eng.ids.eos]); starts.append(len(head)); pick.append(i)
    return rows, starts, b.und_recon[pick]

model = eng.model
params, opt = pt._optimizer(model, r, r.yn_lr)
torch.manual_seed(7)
t0 = time.time()
for step in range(STEPS):
    model.train(); vq.eval()
    rows, starts, recon = rows_batch()
    loss = r.w_yes_no * pt.lm_loss(model, rows, starts, eng.ids.pad, vqm.to_pixels(recon))
    if step % 2 == 0:
        loss = loss + r.w_gen * pt._generation_loss(model, eng, b, r)
    t_rows, t_starts = b.text()
    loss = loss + r.w_text * pt.lm_loss(model, t_rows, t_starts, eng.ids.pad)
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    if (step + 1) % 100 == 0:
        print("step", step + 1, round(time.time() - t0), "s", file=sys.stderr)
        evaluate(step + 1)
out["seconds"] = round(time.time() - t0, 1)
json.dump(out, open(OUT, "w"), indent=1)
