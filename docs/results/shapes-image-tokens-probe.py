"""One-off timing probe (2026-12-04), not part of the package and not run by the tests: what
would a yes/no row cost if the vision encoder gave 16 image tokens (patch 16 on the 64 px
image) instead of the shipped model's 64 (patch 8)? Two random-weight models of the shipped
architecture, differing only there; forward + backward of 48 rows (image + a 25-token
question + a 1-token answer), the two run back to back in rotating order, median of 7.

    python docs/results/shapes-image-tokens-probe.py [OUT.json]
"""
import copy, json, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
torch.set_num_threads(2)
from transformers import JanusConfig, JanusForConditionalGeneration
from ospo.shapes import pretrain as pt

base = JanusConfig.from_pretrained(pt.PACKAGED)
ROWS, Q = 48, 25
models = {}
for n_tok, patch in ((64, 8), (16, 16)):
    cfg = copy.deepcopy(base)
    cfg.vision_config.patch_size = patch
    cfg.vision_config.num_image_tokens = n_tok
    torch.manual_seed(0)
    models[n_tok] = JanusForConditionalGeneration(cfg).train()
side = base.vision_config.image_size
pix = torch.randn(ROWS, 3, side, side)
g = torch.Generator().manual_seed(0)

def step(n_tok):
    m = models[n_tok]
    q = torch.randint(10, 600, (ROWS, Q), generator=g)
    ids = torch.cat([torch.full((ROWS, 1), base.text_config.bos_token_id), torch.full((ROWS, n_tok), base.image_token_id), q], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    t = time.perf_counter()
    out = m(input_ids=ids, pixel_values=pix, labels=labels, use_cache=False)
    out.loss.backward()
    m.zero_grad(set_to_none=True)
    return time.perf_counter() - t

for n in models:
    step(n)  # warm-up
times = {n: [] for n in models}
order = list(models)
for r in range(7):
    for n in (order if r % 2 == 0 else order[::-1]):
        times[n].append(step(n))
res = {"rows": ROWS, "question_tokens": Q, "threads": 2,
       "seconds_median": {f"{n}_image_tokens": round(statistics.median(v), 4) for n, v in times.items()}}
res["ratio_64_over_16"] = round(statistics.median(a / b for a, b in zip(times[64], times[16])), 2)
print(json.dumps(res, indent=1))
if len(sys.argv) > 1:
    Path(sys.argv[1]).write_text(json.dumps(res, indent=1) + "\n")
