# python docs/results/shapes-pool-chunk-check.py (needs the cached VQ: ~/.cache/ospo/vq)
# Do the pool's 32-image VQ passes give the 128-image passes' tokens and uint8 reconstructions?
import random
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from ospo.shapes import pretrain as pt
from ospo.shapes import vq as vqm
r = pt.Recipe()
vq, _ = pt.train_or_load_vq(r, Path.home() / ".cache/ospo/vq", progress=False)
rng = random.Random(7)
imgs, _ = vqm.scene_batch(rng, 256)
def passes(chunk):
    rec = np.concatenate([pt.reconstruct(vq, imgs[a:a + chunk]) for a in range(0, len(imgs), chunk)])
    # Batcher.vq_tokens, the pool's own encoding, without building a whole pool
    b = pt.Batcher.__new__(pt.Batcher)
    b.vq = vq
    tok = torch.cat([b.vq_tokens(imgs[a:a + chunk]) for a in range(0, len(imgs), chunk)])
    return rec, tok
r32, t32 = passes(32); r128, t128 = passes(128)
diff = r32.astype(int) - r128.astype(int)
print({"images": len(imgs), "tokens_equal": bool(torch.equal(t32, t128)),
       "recon_equal": bool((diff == 0).all()), "pixels_differing": int((diff != 0).sum()),
       "of": int(diff.size), "images_differing": int((diff != 0).reshape(len(imgs), -1).any(1).sum()),
       "max_abs": int(np.abs(diff).max())})
