"""Pretraining a tiny Janus that lives in ShapesWorld, part 1: the VQ tokenizer.

:mod:`ospo.shapes.pretrain` runs it as the first step of the recipe (and caches it: the VQ
is trained once and reused while the rest of the recipe changes). Alone:

    python -m ospo.shapes.vq --out DIR [--steps 200] [--batch-size 32] [--seed 0]

trains a ``JanusVQVAE`` (the configuration :func:`ospo.tiny.tiny_config` gives a 64 px,
8 x 8-token Janus) on rendered scenes, saves it with ``save_pretrained`` in ``DIR/vq`` and
reports the fraction of held-out scenes whose reconstruction (stock ``encode`` -> stock
``decode``, the path generated tokens take) the ground-truth evaluator still accepts.

Why the VQ is trainable to near-perfect here: objects fill 3 x 3-cell boxes aligned to the
8 px token grid and boxes never touch, so every 8 x 8 px cell of every image is either blank
or one cell of one object: 3 shapes x 9 box cells x 4 colours, less the two blank top corners
of the triangle, = 100 object cells + blank = 101 cell kinds (:data:`CELL_CODES`).

**Assigned codes.** The world knows what every cell holds, so each of the 101 cell kinds gets
a code of its own (:func:`cell_codes`; the full middle cells of a circle and a square look the
same but keep their object's code, which the encoder reads from the neighbouring cells) and
the VQ is trained to use exactly that code: the
encoder by cross-entropy of its cosine logits against the assigned code, the decoder (and the
codebook) by reconstructing the image from the assigned codes. The token sequence of a scene
is then a deterministic function of its layout, one code per patch. A VQ left to find its own
codes (the previous recipe: nearest code + straight-through + dead-code resets) spread the
blank background over most of a 256-code book: its code for a blank cell depended on the
cell's surroundings (the encoder's receptive field and mid-block attention reach the whole
image), measured H(code | patch) = 3.7 nats over 64,000 cells, and the language model spent
its budget predicting those context-dependent codes instead of the scene (1.15 nats per
visual token after the whole recipe). With assigned codes the stock ``encode`` returns the
assigned code for 100% of held-out cells after 200 steps (3 minutes), and a cell's code is
fixed by what the scene puts there.
This is a choice of the tokenizer, not of the world or the generator: what the language
model must still learn is which patches to place where for a prompt.

Traps of ``JanusVQVAE`` (../shared/shapesworld-notes.md), each handled here:

- the stock ``forward`` re-embeds the argmin indices, so reconstruction sends no gradient
  to the encoder: :func:`vq_forward` is a training forward built from the model's own
  parts (encoder -> quant_conv -> code -> post_quant_conv -> decoder) whose reconstruction
  reaches both the codebook and (straight-through) the encoder;
- ``decode`` unit-normalizes codebook vectors while ``encode`` quantizes against the raw
  book: we train with the latent and the codebook unit-normalized (cosine codes) and keep
  the stored book normalized, so stock ``encode`` picks the code with the highest cosine
  (``argmin |z|^2 + 1 - 2 z.e`` = ``argmax z.e`` when every ``|e| = 1``);
- ``JanusVQVAE.__init__`` calls ``eval()``: we switch to train mode;
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

def _cell_table() -> dict[tuple[str, str, int, int], int]:
    """(shape, colour, row, col of the cell in the object's 3 x 3 box) -> code, for every
    cell that holds some of the object; code 0 is the blank cell."""
    table = {}
    for shape in w.SHAPES:
        for color in w.COLORS:
            for r in range(w.BOX_CELLS):
                for c in range(w.BOX_CELLS):
                    if w.STAMPS[shape][r * w.CELL:(r + 1) * w.CELL, c * w.CELL:(c + 1) * w.CELL].any():
                        table[(shape, color, r, c)] = len(table) + 1
    return table


BLANK_CODE = 0
CELL_CODES: dict[tuple[str, str, int, int], int] = _cell_table()
NUM_CELL_CODES = len(CELL_CODES) + 1   # 101 with the blank cell


def cell_codes(layouts: list[w.Layout]) -> np.ndarray:
    """(N, GRID * GRID) int64: the assigned code of every cell of each layout, row-major
    (the token order)."""
    out = np.full((len(layouts), w.GRID, w.GRID), BLANK_CODE, dtype=np.int64)
    for n, lay in enumerate(layouts):
        for o in lay.objects:
            for r in range(w.BOX_CELLS):
                for c in range(w.BOX_CELLS):
                    out[n, o.row + r, o.col + c] = CELL_CODES.get((o.shape, o.color, r, c), BLANK_CODE)
    return out.reshape(len(layouts), -1)


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


def vq_forward(vq, pixel_values: torch.Tensor, codes: torch.Tensor | None = None, *,
               logit_scale: float = 10.0) -> dict:
    """The training forward. ``codes`` (B, g * g): the assigned codes (:func:`cell_codes`);
    the decoder reconstructs from them, the encoder's cosine logits are trained towards them
    (``code_loss``, cross-entropy). Without ``codes`` the nearest code is used (what stock
    ``encode`` picks). The reconstruction's gradient reaches the codebook (through the code
    vectors) and the encoder (straight-through). ``indices``: the nearest codes, what stock
    ``encode`` returns when the stored codebook is unit-normalized."""
    h = vq.quant_conv(vq.encoder(pixel_values))               # (B, D, g, g)
    z = F.normalize(h.permute(0, 2, 3, 1), dim=-1)            # (B, g, g, D), unit latents
    book = F.normalize(vq.quantize.embedding.weight, dim=-1)  # (K, D)
    logits = torch.einsum("bhwd,kd->bhwk", z, book)          # cosines
    idx = logits.detach().argmax(-1)
    use = idx if codes is None else codes.view(idx.shape)
    e = book[use]                                             # (B, g, g, D)
    zq = e + (z - z.detach())                                 # value e; straight-through to z
    recon = vq.decoder(vq.post_quant_conv(zq.permute(0, 3, 1, 2).contiguous()))
    code_loss = F.cross_entropy(logits.flatten(0, 2) * logit_scale, use.flatten())
    return {"recon": recon, "indices": idx.flatten(1), "code_loss": code_loss}


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
             lr: float = 2e-3, object_weight: float = 5.0, seed: int = 0, log_every: int = 25,
             progress: bool = True) -> dict:
    """Train in place, with assigned codes, for ``steps`` or ``minutes`` (whichever ends
    first). Returns stats, with ``history`` every ``log_every`` steps: the losses and
    ``code_acc``, the fraction of the batch's cells whose nearest code is the assigned one."""
    from tqdm import tqdm

    from ospo.shapes.grammar import heldout_scenes

    if vq.quantize.num_embeddings < NUM_CELL_CODES:
        raise ValueError(f"the codebook has {vq.quantize.num_embeddings} codes; ShapesWorld needs "
                         f"{NUM_CELL_CODES} (one per distinct cell)")
    exclude = heldout_scenes()
    vq.train()
    opt = torch.optim.Adam(vq.parameters(), lr=lr, betas=(0.9, 0.99))
    rng = random.Random(f"shapes-vq:{seed}")
    t0 = time.perf_counter()
    budget = math.inf if minutes is None else minutes * 60
    bar = tqdm(total=steps, desc="vq", unit="step", disable=not progress)
    step, hist = 0, []
    while (steps is None or step < steps) and time.perf_counter() - t0 < budget:
        imgs, layouts = scene_batch(rng, batch_size, exclude)
        x = to_pixels(imgs)
        codes = torch.from_numpy(cell_codes(layouts))
        out = vq_forward(vq, x, codes)
        rl = recon_loss(out["recon"], x, object_weight)
        loss = rl + out["code_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        normalize_codebook_(vq)
        step += 1
        if step % log_every == 0 or step == steps:
            acc = (out["indices"] == codes).float().mean().item()
            hist.append({"step": step, "loss": round(loss.item(), 5), "recon": round(rl.item(), 5),
                         "code_loss": round(out["code_loss"].item(), 5), "code_acc": round(acc, 5)})
            bar.set_postfix(recon=f"{rl.item():.4f}", code_acc=f"{acc:.3f}")
        bar.update(1)
    bar.close()
    vq.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "history": hist}


def code_agreement(vq, n: int = 200, seed: int = 12345) -> float:
    """Fraction of held-out scenes' cells for which stock ``encode`` returns the assigned code."""
    from ospo.shapes.grammar import heldout_records

    held = heldout_records()
    scenes = [w.Scene.from_dict(held[i % len(held)]["scene"]) for i in range(n)]
    layouts = w.sample_layouts(scenes, seed=seed, tag="vq-codes")
    _, toks = reconstruct(vq, w.render_batch(layouts))
    return float((toks == cell_codes(layouts)).mean())


def main(argv: list[str] | None = None) -> dict:
    v = argparse.ArgumentParser(prog="python -m ospo.shapes.vq", description="train the ShapesWorld VQ tokenizer")
    v.add_argument("--out", required=True)
    v.add_argument("--minutes", type=float, default=None)
    v.add_argument("--steps", type=int, default=200)
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
    stats["eval"] = dict(recognition(vq, n=a.eval_n), code_agreement=code_agreement(vq, n=a.eval_n))
    (out / "vq_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k != "history"}), file=sys.stderr)
    return stats


if __name__ == "__main__":
    main()
