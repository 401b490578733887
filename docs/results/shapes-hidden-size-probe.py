"""One-off timing probe (2026-12-06), kept as the record of docs/results/shapes-hidden-size-probe.json;
not part of the package and not run by the tests.

What would a narrower model save per recipe step? Forward + backward (+ AdamW step) of one
phase-1 step's rows (32 generation rows, 40 yes/no + 8 caption rows, 24 packed text rows) for
random-initialised models of the recipe's architecture at several hidden sizes (head size 32
throughout, as the shipped 192 / 6 heads), in alternation, medians compared. Cost only: whether
a narrower model still learns the jobs is not measured here.

    python docs/results/shapes-hidden-size-probe.py OUT.json
"""
import dataclasses, json, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
torch.set_num_threads(2)
from transformers import JanusForConditionalGeneration
from ospo.engine import Engine
from ospo.tiny import make_processor
from ospo.shapes import pretrain as pt, vq as vqm

base = Engine.load(path="shapes:")
tok = base.tokenizer
arms = {}
for hidden in (128, 192):   # heads = hidden // 32 must divide by kv_heads (2)
    r = dataclasses.replace(pt.Recipe(), gen_pool=64, und_pool=64, hidden=hidden, heads=hidden // 32)
    torch.manual_seed(0)
    cfg = pt.model_config(r, tok)
    m = JanusForConditionalGeneration(cfg)
    m.model.vqmodel.load_state_dict(base.model.model.vqmodel.state_dict())
    eng = Engine(m, make_processor(tok, cfg), path="x", device=torch.device("cpu"), dtype=torch.float32)
    b = pt.Batcher(eng, m.model.vqmodel, r, progress=False)
    params, opt = pt._optimizer(m, r, 1e-4)
    arms[hidden] = (m, eng, b, r, params, opt, sum(p.numel() for p in m.parameters()))

def step(m, eng, b, r, params, opt, _n):
    m.train(); m.model.vqmodel.eval()
    loss = pt._generation_loss(m, eng, b, r)
    rows, starts, recon, kinds = b.understanding(); k = kinds.count("yes_no"); pv = vqm.to_pixels(recon)
    loss = loss + pt.lm_loss(m, rows[:k], starts[:k], eng.ids.pad, pv[:k]) + 0.5 * pt.lm_loss(m, rows[k:], starts[k:], eng.ids.pad, pv[k:])
    loss = loss + pt._text_loss(m, eng, b, r)
    opt.zero_grad(); loss.backward(); opt.step()

times = {h: [] for h in arms}
for rep in range(6):
    for h, a in arms.items():
        t = time.perf_counter(); step(*a); times[h].append(time.perf_counter() - t)
med = {h: round(statistics.median(v[1:]), 3) for h, v in times.items()}
out = {"rows": "32 generation + 40 yes/no + 8 caption + 24 text (packed to 256)", "threads": 2, "repeats": 5,
       "parameters": {h: a[-1] for h, a in arms.items()}, "seconds_median": med,
       "ratio_192_over": {h: round(med[192] / med[h], 2) for h in med}}
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[1], "w"), indent=1)
