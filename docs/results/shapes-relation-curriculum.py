"""One-off diagnostic (2026-12-04), kept as the record of how docs/results/shapes-relation-curriculum.json
was measured; not part of the package and not run by the tests.

Can relation questions be grown the way phase 2 grows presence questions (one fixed question,
then one more wording at a time)? Fine-tunes the shipped ShapesWorld checkpoint in memory
(nothing is saved) on yes/no rows only: 48 per step, fresh AdamW at LR, on two-object images
(two different shapes, random colours, one of the four relations). A schedule is a list of
stage:steps (stages in STAGE_HELP). Every 50 steps: accuracy on 200 balanced questions of every
stage, on held-out layouts (another seed).

    python docs/results/shapes-relation-curriculum.py fixed:150,csl:200,cs:250 [LR]
"""
import dataclasses, json, random, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np, torch
torch.set_num_threads(2)
from ospo.engine import Engine
from ospo.shapes import pretrain as pt, world as w, grammar as gr, vq as vqm
from ospo.shapes.world import Scene, Group
from ospo.shapes.evaluate import detect, check
from ospo.understanding import query_ids
STAGE_HELP = {"fixed": "Is the circle to the left of the square?", "csl": "circle/square either order, left of",
              "cs": "circle/square either order, left of / right of", "lr": "any two shapes, left of / right of",
              "all": "any two shapes, any relation"}
STAGES = sys.argv[1].split(",")
LR = float(sys.argv[2]) if len(sys.argv) > 2 else 3e-4
eng = Engine.load(path=str(pt.packaged_checkpoint()))
vq = eng.model.model.vqmodel; model = eng.model
yes = eng.tokenizer(" yes", add_special_tokens=False)["input_ids"]; no = eng.tokenizer(" no", add_special_tokens=False)["input_ids"]
def pool(n, seed):
    rng = random.Random(seed); lays = []
    while len(lays) < n:
        a, b = rng.sample(w.SHAPES, 2)
        rel = rng.choice(w.RELATIONS)
        s = Scene((Group(a, 1, rng.choice(w.COLORS)), Group(b, 1, rng.choice(w.COLORS))), rel)
        lays.append(w.sample_layout(s, rng))
    imgs = w.render_batch(lays)
    return pt.reconstruct(vq, imgs), [detect(im) for im in imgs]
def question(rng, dets, stage, want):
    for _ in range(50):
        shapes = [d.shape for d in dets]
        if stage == "fixed":
            a, b, rel = "circle", "square", "left of"
            if not {"circle", "square"} <= set(shapes): return None
        elif stage == "csl":
            if not {"circle", "square"} <= set(shapes): return None
            a, b = rng.sample(["circle", "square"], 2); rel = "left of"
        elif stage in ("cs", "cs4"):
            if not {"circle", "square"} <= set(shapes): return None
            a, b = rng.sample(["circle", "square"], 2)
            rel = rng.choice(["left of", "right of"]) if stage == "cs" else rng.choice(w.RELATIONS)
        else:
            a, b = rng.sample(shapes, 2) if len(set(shapes)) >= 2 else (None, None)
            if a is None: return None
            rel = rng.choice(["left of", "right of"]) if stage == "lr" else rng.choice(w.RELATIONS)
        qs = Scene((Group(a, 1, None), Group(b, 1, None)), rel)
        t = check(qs, dets)["requirements"][-1]["ok"]
        if t == want:
            return gr.questions(qs)[-1]["question"]
    return None
def rows(recon, dets, stage, n, rng):
    R, S, P = [], [], []
    while len(R) < n:
        i = rng.randrange(len(dets)); want = rng.random() < 0.5
        q = question(rng, dets[i], stage, want)
        if q is None: continue
        h = query_ids(eng, q); R.append(h + (yes if want else no) + [eng.ids.eos]); S.append(len(h)); P.append(i)
    return R, S, recon[P]
t0 = time.time()
tr_recon, tr_dets = pool(3000, "train"); ev_recon, ev_dets = pool(300, "eval")
print("pools", round(time.time()-t0), flush=True)
def evalset(stage):
    rng = random.Random("ev" + stage); items = []
    i = 0
    while len(items) < 200:
        want = len(items) % 2 == 0; q = question(rng, ev_dets[i % 300], stage, want); i += 1
        if q: items.append((ev_recon[(i-1) % 300], q, want))
    return items
evs = {s: evalset(s) for s in ("fixed", "csl", "cs", "lr", "all")}
def ev(step):
    print(step, name if step else '', round(time.time()-t0), {s: pt.yes_no_eval(eng, it)["accuracy"] for s, it in evs.items()}, flush=True)
name = ''
ev(0)
r = pt.Recipe(); params, opt = pt._optimizer(model, r, LR)
rng = random.Random(1); step = 0
for st in STAGES:
    name, n = st.split(":")
    for _ in range(int(n)):
        model.train(); vq.eval()
        R, S, rec = rows(tr_recon, tr_dets, name, 48, rng)
        loss = pt.lm_loss(model, R, S, eng.ids.pad, vqm.to_pixels(rec))
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); step += 1
        if step % 50 == 0: ev(step)
