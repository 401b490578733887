"""Probe: does torch.compile make a ShapesWorld training step cheaper on this CPU?

Eager vs torch.compile(model) on the rows of a phase-2 step (48 yes/no rows padded to a
fixed length so the compiled graph is reused), forward + backward, alternated, medians.
"""
import dataclasses, json, random, statistics, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ospo.engine import Engine
from ospo.shapes import pretrain as pt
from ospo.shapes import vq as vqm

torch.set_num_threads(2)
eng = Engine.load(path="shapes:")
model = eng.model
r = dataclasses.replace(pt.Recipe(), gen_pool=4, und_pool=200)
b = pt.Batcher(eng, model.model.vqmodel, r, seed_tag="bench", progress=False)
pad = eng.ids.pad
T_FIX = int(sys.argv[1]) if len(sys.argv) > 1 else 112


def loss_fn(m, rows, starts, pv):
    """pretrain.lm_loss, but padded to the fixed T_FIX (lm_loss pads to the longest row, which
    would recompile per length); lm_loss itself is not given a length argument because any
    edit to pretrain.py changes the shipped checkpoint's recipe hash."""
    T = T_FIX
    B = len(rows)
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, (rw, s) in enumerate(zip(rows, starts)):
        off = T - len(rw)
        ids[i, off:] = torch.tensor(rw)
        mask[i, off:] = 1
        labels[i, off + s:] = torch.tensor(rw[s:])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = m(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=pv, use_cache=False)
    logits = out.logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


model.train(); model.model.vqmodel.eval()
t0 = time.perf_counter()
cm = torch.compile(model, dynamic=False)
times = {"eager": [], "compiled": []}
first = None
for rep in range(9):
    rows, starts, recon = b.curriculum_yes_no(None)
    assert max(len(x) for x in rows) <= T_FIX, max(len(x) for x in rows)
    pv = vqm.to_pixels(recon)
    ls = {}
    for k, m in (("eager", model), ("compiled", cm)):
        t = time.perf_counter()
        loss = loss_fn(m, rows, starts, pv)
        loss.backward()
        dt = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        ls[k] = loss.item()
        if rep == 0 and k == "compiled":
            first = dt
        if rep >= 2:
            times[k].append(dt)
    print(rep, ls, flush=True)
med = {k: statistics.median(v) for k, v in times.items()}
print(json.dumps({"T": T_FIX, "first_compiled_call_s": round(first, 1), "median_s": med,
                  "speedup": med["eager"] / med["compiled"]}, indent=1))
