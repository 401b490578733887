"""One-off diagnostic (2026-12-06), kept as the record of the "attribution" entry of
docs/results/shapes-recipe-v5-build.json; not part of the package and not run by the tests.

Does bf16 autocast slow yes/no learning from a fresh vision encoder? The shipped model with its
vision encoder and aligner re-initialised learns captions + the yes/no curriculum (presence
questions grown one shape per STEPS/6 steps, then the full mix), float32 vs bf16 arms, same seed
and data stream; held-out accuracy on 200 recipe-evaluation questions every STEPS/6 steps.

    python docs/results/shapes-bf16-ab.py 480 fp32,bf16 OUT.json
"""

import contextlib, dataclasses, json, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
torch.set_num_threads(2)
from transformers import JanusForConditionalGeneration
from ospo.engine import Engine
from ospo.tiny import make_processor
from ospo.shapes import pretrain as pt, vq as vqm
STEPS, ARMS, OUT = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
base = Engine.load(path="shapes:")
tok = base.tokenizer
r = dataclasses.replace(pt.Recipe(), gen_pool=4, und_pool=2000, yes_no_rows=0, caption_rows=16, yn_stage_steps=STEPS // 6)
out = {}
sd = base.model.state_dict()
for arm in ARMS:
    torch.manual_seed(0)
    cfg = pt.model_config(r, tok)
    m = JanusForConditionalGeneration(cfg)
    keep = {k: v for k, v in sd.items() if not (k.startswith("model.vision_model") or k.startswith("model.aligner"))}
    missing, unexpected = m.load_state_dict(keep, strict=False)
    assert all(k.startswith("model.vision_model") or k.startswith("model.aligner") for k in missing), missing[:5]
    eng = Engine(m, make_processor(tok, cfg), path="x", device=torch.device("cpu"), dtype=torch.float32)
    b = pt.Batcher(eng, m.model.vqmodel, r, seed_tag="patchab", progress=False)
    ev = pt.yes_no_eval_set(r, 200, m.model.vqmodel)
    params, opt = pt._optimizer(m, r, 1e-3)
    hist = []; t0 = time.time()
    for step in range(STEPS):
        m.train(); m.model.vqmodel.eval()
        for g in opt.param_groups: g["lr"] = 1e-3 * min(1, (step + 1) / 50)
        with torch.autocast("cpu", dtype=torch.bfloat16) if arm == "bf16" else contextlib.nullcontext():
            u_rows, u_starts, recon, kinds = b.understanding()
            cap = pt.lm_loss(m, u_rows, u_starts, eng.ids.pad, vqm.to_pixels(recon))
            rows, starts, rc = b.curriculum_yes_no(pt.curriculum_shapes(step, r))
            yn = pt.lm_loss(m, rows, starts, eng.ids.pad, vqm.to_pixels(rc))
            loss = yn + 0.5 * cap
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
        if (step + 1) % (STEPS // 6) == 0:
            acc = pt.yes_no_eval(eng, ev)["accuracy"]
            hist.append({"step": step + 1, "acc": acc, "cap": round(cap.item(), 3), "yn": round(yn.item(), 3), "s": round(time.time() - t0, 1)})
            print(arm, hist[-1], flush=True)
    out[arm] = hist
    json.dump(out, open(OUT, "w"), indent=1)
