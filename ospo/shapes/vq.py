"""Pretraining a tiny Janus that lives in ShapesWorld, part 1: the VQ tokenizer.

:mod:`ospo.shapes.pretrain` runs it as the first step of the recipe (and caches it: the VQ
is trained once and reused while the rest of the recipe changes). Alone:

    python -m ospo.shapes.vq --out DIR [--steps 400] [--batch-size 32] [--seed 0]

trains a ``JanusVQVAE`` (the configuration :func:`ospo.tiny.tiny_config` gives a 64 px,
8 x 8-token Janus) on rendered scenes, saves it with ``save_pretrained`` in ``DIR/vq`` and
reports the fraction of held-out scenes whose reconstruction (stock ``encode`` -> stock
``decode``, the path generated tokens take) the ground-truth evaluator still accepts.

Why the VQ is trainable to near-perfect here: objects fill 3 x 3-cell boxes aligned to the
8 px token grid and boxes never overlap, so every 8 x 8 px cell of every image is one of
3 shapes x 4 colours x 9 box positions + blank = 109 distinct patches: a 256-code book can
name each exactly. What remains is optimisation, and the notes
(../shared/shapesworld-notes.md) list its traps, each handled here:

- the stock ``forward`` re-embeds the argmin indices, so reconstruction sends no gradient
  to the encoder: :func:`vq_forward` is a training forward built from the model's own
  parts (encoder -> quant_conv -> nearest code with a straight-through estimator ->
  post_quant_conv -> decoder);
- ``decode`` unit-normalizes codebook vectors while ``encode`` quantizes against the raw
  book: we train with the latent and the codebook unit-normalized (cosine codes) and keep
  the stored book normalized, so stock ``encode`` picks the same codes as training
  (``argmin |z|^2 + 1 - 2 z.e`` = ``argmax z.e`` when every ``|e| = 1``);
- ``JanusVQVAE.__init__`` calls ``eval()``: we switch to train mode;
- unused codes die: every ``reset_every`` steps, codes unused since the last reset are
  re-seeded from latents of the current batch;
- object pixels are few: they weigh ``object_weight`` times the background's in the loss.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ospo.shapes import world as w


# --- data --------------------------------------------------------------------------------

def scene_batch(rng: random.Random, n: int, exclude: set | None = None) -> tuple[np.ndarray, list[w.Layout]]:
    """n rendered scenes drawn over the covered sub-categories (held-out scenes excluded)."""
    layouts = []
    while len(layouts) < n:
        sub = rng.choice(w.COVERED)
        s = w.sample_scene(sub, rng)
        if exclude and s in exclude:
            continue
        layouts.append(w.sample_layout(s, rng))
    return w.render_batch(layouts), layouts


def to_pixels(imgs: np.ndarray) -> torch.Tensor:
    """uint8 (N, 64, 64, 3) -> float (N, 3, 64, 64) in [-1, 1] (Janus' image normalization)."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(pix: torch.Tensor) -> np.ndarray:
    return ((pix.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# --- the model ---------------------------------------------------------------------------

def vq_config(*, channels: int = 32, levels: int = 4, codebook: int = 256, grid: int = 8):
    """The VQ sub-config of :func:`ospo.tiny.tiny_config` (same formula), standalone."""
    from ospo.tiny import build_tokenizer, tiny_config

    return tiny_config(build_tokenizer(), grid=grid, codebook=codebook, vq_channels=channels, vq_levels=levels).vq_config


def build_vq(config=None, seed: int = 0):
    from transformers import JanusVQVAE

    torch.manual_seed(seed)
    vq = JanusVQVAE(config or vq_config())
    normalize_codebook_(vq)
    return vq


@torch.no_grad()
def normalize_codebook_(vq) -> None:
    emb = vq.quantize.embedding.weight
    emb.copy_(F.normalize(emb, dim=-1))


def vq_forward(vq, pixel_values: torch.Tensor) -> dict:
    """The training forward: reconstruction with gradient to the encoder (straight-through),
    plus the codebook and commitment losses; ``indices`` are what stock ``encode`` picks
    when the stored codebook is unit-normalized."""
    h = vq.quant_conv(vq.encoder(pixel_values))               # (B, D, g, g)
    z = F.normalize(h.permute(0, 2, 3, 1), dim=-1)            # (B, g, g, D), unit latents
    book = F.normalize(vq.quantize.embedding.weight, dim=-1)  # (K, D)
    idx = torch.einsum("bhwd,kd->bhwk", z.detach(), book.detach()).argmax(-1)
    e = book[idx]                                             # (B, g, g, D)
    codebook_loss = F.mse_loss(e, z.detach())
    commit_loss = F.mse_loss(z, e.detach())
    zq = z + (e - z).detach()                                 # straight-through
    recon = vq.decoder(vq.post_quant_conv(zq.permute(0, 3, 1, 2).contiguous()))
    return {"recon": recon, "indices": idx.flatten(1), "codebook_loss": codebook_loss, "commit_loss": commit_loss}


def recon_loss(recon: torch.Tensor, target: torch.Tensor, object_weight: float) -> torch.Tensor:
    is_obj = (target < 0.99).any(1, keepdim=True).float()     # non-white pixels
    weight = 1.0 + (object_weight - 1.0) * is_obj
    return ((recon - target) ** 2 * weight).sum() / (weight.sum() * recon.shape[1])


@torch.no_grad()
def reconstruct(vq, imgs: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Stock path: ``encode`` -> tokens -> ``decode``. Returns (uint8 images, tokens)."""
    vq.eval()
    outs, toks = [], []
    for a in range(0, len(imgs), batch_size):
        enc = vq.encode(to_pixels(imgs[a:a + batch_size]), return_dict=True)
        t = enc.image_tokens.view(len(imgs[a:a + batch_size]), -1)
        outs.append(to_uint8(vq.decode(t)))
        toks.append(t.cpu().numpy())
    return np.concatenate(outs), np.concatenate(toks)


def recognition(vq, n: int = 200, seed: int = 12345) -> dict:
    """Fraction of held-out scenes the evaluator accepts after a VQ round trip."""
    from ospo.shapes.evaluate import evaluate
    from ospo.shapes.grammar import heldout_records

    held = heldout_records()
    scenes = [w.Scene.from_dict(held[i % len(held)]["scene"]) for i in range(n)]
    layouts = w.sample_layouts(scenes, seed=seed, tag="vq-eval")
    imgs = w.render_batch(layouts)
    rec, _ = reconstruct(vq, imgs)
    ok = [evaluate(s, r)["correct"] for s, r in zip(scenes, rec)]
    return {"recognised": float(np.mean(ok)), "n": n,
            "pixel_mse": float(((rec.astype(np.float32) - imgs) / 127.5).__pow__(2).mean())}


# --- training ----------------------------------------------------------------------------

def train_vq(vq, *, minutes: float | None = 8.0, steps: int | None = None, batch_size: int = 32,
             lr: float = 2e-3, object_weight: float = 5.0, beta: float = 0.25, reset_every: int = 25,
             seed: int = 0, log_every: int = 25, progress: bool = True) -> dict:
    """Train in place for ``steps`` or ``minutes`` (whichever ends first). Returns stats."""
    from tqdm import tqdm

    from ospo.shapes.grammar import heldout_scenes

    exclude = heldout_scenes()
    vq.train()
    opt = torch.optim.Adam(vq.parameters(), lr=lr, betas=(0.9, 0.99))
    rng = random.Random(f"shapes-vq:{seed}")
    K = vq.quantize.num_embeddings
    used = torch.zeros(K, dtype=torch.bool)
    t0 = time.perf_counter()
    budget = math.inf if minutes is None else minutes * 60
    total = steps if steps is not None else None
    bar = tqdm(total=total, desc="vq", unit="step", disable=not progress)
    step, hist = 0, []
    while (steps is None or step < steps) and time.perf_counter() - t0 < budget:
        imgs, _ = scene_batch(rng, batch_size, exclude)
        x = to_pixels(imgs)
        out = vq_forward(vq, x)
        rl = recon_loss(out["recon"], x, object_weight)
        loss = rl + out["codebook_loss"] + beta * out["commit_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        normalize_codebook_(vq)
        used[out["indices"].unique()] = True
        step += 1
        if step % reset_every == 0:
            dead = (~used).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    h = F.normalize(vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1).reshape(-1, vq.quantize.embedding_dim), dim=-1)
                    pick = torch.randint(len(h), (len(dead),), generator=torch.Generator().manual_seed(step))
                    vq.quantize.embedding.weight[dead] = h[pick] + 0.01 * torch.randn(len(dead), h.shape[1])
                    normalize_codebook_(vq)
            hist.append({"step": step, "loss": loss.item(), "recon": rl.item(), "codes_used": int(used.sum()),
                         "reset": int(len(dead))})
            used.zero_()
        if step % log_every == 0:
            bar.set_postfix(recon=f"{rl.item():.4f}", codes=int(out['indices'].unique().numel()))
        bar.update(1)
    bar.close()
    vq.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "history": hist}


def main(argv: list[str] | None = None) -> dict:
    v = argparse.ArgumentParser(prog="python -m ospo.shapes.vq", description="train the ShapesWorld VQ tokenizer")
    v.add_argument("--out", required=True)
    v.add_argument("--minutes", type=float, default=None)
    v.add_argument("--steps", type=int, default=400)
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--lr", type=float, default=2e-3)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--eval-n", type=int, default=200)
    a = v.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    vq = build_vq(seed=a.seed)
    stats = train_vq(vq, minutes=a.minutes, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    out = Path(a.out)
    vq.save_pretrained(out / "vq")
    stats["eval"] = recognition(vq, n=a.eval_n)
    (out / "vq_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k != "history"}), file=sys.stderr)
    return stats


if __name__ == "__main__":
    main()
