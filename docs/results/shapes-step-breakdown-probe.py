"""Probe: where a phase-2 step's time goes on the shipped ShapesWorld model (2 threads).

    python docs/results/shapes-step-breakdown-probe.py

Times, medians of 8 after 2 warm-ups: drawing one phase-2 step's rows (48 yes/no with their
images, 32 generation, 24 text packed), the vision encoder's forward + backward on the 48
images alone, and forward + backward of the 48 yes/no rows (vision encoder included).
"""
import dataclasses, json, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ospo.engine import Engine
from ospo.shapes import pretrain as pt
from ospo.shapes import vq as vqm
from ospo.shapes.packing import pack_rows

torch.set_num_threads(2)
eng = Engine.load(path="shapes:")
m = eng.model
r = dataclasses.replace(pt.Recipe(), gen_pool=256, und_pool=256)
b = pt.Batcher(eng, m.model.vqmodel, r, seed_tag="breakdown-probe", progress=False)
t_prep, t_vis, t_rows = [], [], []
for i in range(10):
    t = time.perf_counter()
    rows, starts, recon = b.curriculum_yes_no(None)
    pv = vqm.to_pixels(recon)
    b.generation()
    pack_rows(*b.text(), r.text_pack_len)
    t_prep.append(time.perf_counter() - t)
    t = time.perf_counter()
    f = m.model.get_image_features(pv)
    f = f.pooler_output if f.pooler_output is not None else f.last_hidden_state
    f.sum().backward()
    t_vis.append(time.perf_counter() - t)
    m.zero_grad(set_to_none=True)
    t = time.perf_counter()
    pt.lm_loss(m, rows, starts, eng.ids.pad, pv).backward()
    t_rows.append(time.perf_counter() - t)
    m.zero_grad(set_to_none=True)
med = lambda v: round(statistics.median(v[2:]), 4)
print(json.dumps({"draw_rows_s": med(t_prep), "vision_encoder_fwd_bwd_48_images_s": med(t_vis),
                  "yes_no_48_rows_fwd_bwd_s": med(t_rows)}, indent=1))
