"""One-off diagnostic (2026-12-04), kept as the record of the "attribution" entry of
docs/results/shapes-recipe-packed-build.json; not part of the package and not run by the tests.

From one checkpoint, the same full-mix yes/no fine-tune under several batch layouts (ARM =
rows_<images>x<questions per image> or packed_<images>x<questions per image>; each image's
questions packed behind it by ospo.shapes.packing): does packing learn as much per step?

    python docs/results/shapes-packing-ab.py CHECKPOINT STEPS SEED rows_48x1,packed_48x2,packed_12x4
"""
import dataclasses, json, random, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
torch.set_num_threads(2)
from ospo.engine import Engine
from ospo.shapes import pretrain as pt, packing, vq as vqm
CK, STEPS, SEED = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {"checkpoint": CK, "steps": STEPS, "seed": SEED, "arms": {}}
eng = Engine.load(path=CK)
vq = eng.model.model.vqmodel
r = dataclasses.replace(pt.Recipe(), gen_pool=4, und_pool=2000)
b = pt.Batcher(eng, vq, r, seed_tag="packab", progress=False)
ev = pt.yes_no_eval_set(r, 400, vq)
init = {k: v.clone() for k, v in eng.model.state_dict().items()}
ARMS = {a: tuple(map(int, a.split("_")[1].split("x"))) for a in sys.argv[4].split(",")}
for arm, (n_img, k) in ARMS.items():
    eng.model.load_state_dict(init)
    model = eng.model
    params, opt = pt._optimizer(model, r, r.yn_lr)
    rng = random.Random(f"packab:{SEED}")
    torch.manual_seed(SEED)
    hist = [{"step": 0, "acc": pt.yes_no_eval(eng, ev)["accuracy"]}]
    t0 = time.time()
    for step in range(STEPS):
        model.train(); vq.eval()
        groups, pick = packing.group_questions(eng, b, n_img, k, rng)
        pv = vqm.to_pixels(b.und_recon[pick])
        loss = packing.packed_lm_loss(model, groups, eng.ids.pad, pv)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
        if (step + 1) % 100 == 0:
            hist.append({"step": step + 1, "acc": pt.yes_no_eval(eng, ev)["accuracy"], "seconds": round(time.time() - t0, 1)})
            print(arm, hist[-1], flush=True)
    out["arms"][arm] = hist
    json.dump(out, open(f"packing-ab-{SEED}.json", "w"), indent=1)
