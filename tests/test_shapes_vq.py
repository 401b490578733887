"""ShapesWorld pretraining, VQ stage: one assigned code per distinct cell, the training forward
passes the reconstruction's gradient to the encoder (the stock forward does not), stock
``encode`` picks the codes training picks, and a few steps move the weights while keeping
the codebook unit-normalized."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ospo.shapes import vq as pt
from ospo.shapes import world as w


def test_assigned_codes_name_each_distinct_cell_exactly():
    imgs, layouts = pt.scene_batch(random.Random(3), 300)
    codes = pt.cell_codes(layouts)
    assert codes.shape == (300, 64) and codes.min() >= 0 and codes.max() < pt.NUM_CELL_CODES
    assert pt.NUM_CELL_CODES == 101   # 3 shapes x 9 cells x 4 colours - 2 blank triangle corners x 4, + blank
    cells = imgs.reshape(300, 8, 8, 8, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(300 * 64, -1)
    by_code: dict[int, bytes] = {}
    by_patch: dict[bytes, set] = {}
    for c, patch in zip(codes.reshape(-1), cells):
        key = patch.tobytes()
        assert by_code.setdefault(int(c), key) == key        # one patch per code
        by_patch.setdefault(key, set()).add(int(c))
    # one code per patch, except the fully coloured middle cells, which the circle's, the
    # square's and the triangle's boxes share pixel for pixel: each keeps its object's code
    for key, cs in by_patch.items():
        if len(cs) > 1:
            px = np.frombuffer(key, dtype=np.uint8).reshape(-1, 3)
            assert len(np.unique(px, axis=0)) == 1 and len(cs) <= 3, cs
    assert by_code[pt.BLANK_CODE] == bytes([255]) * 192     # the blank cell
    assert len(by_code) > 80                                  # most codes seen in 300 scenes


def test_vq_training_forward_and_steps():
    vq = pt.build_vq(pt.vq_config(channels=32, levels=4, codebook=128), seed=0)
    vq.train()
    imgs, layouts = pt.scene_batch(random.Random(0), 2)
    x = pt.to_pixels(imgs)
    codes = torch.from_numpy(pt.cell_codes(layouts))
    out = pt.vq_forward(vq, x, codes)
    pt.recon_loss(out["recon"], x, 5.0).backward(retain_graph=True)
    assert vq.encoder.conv_in.weight.grad is not None and vq.encoder.conv_in.weight.grad.abs().sum() > 0
    used = vq.quantize.embedding.weight.grad.abs().sum(-1) > 0
    assert set(used.nonzero().flatten().tolist()) == set(codes.unique().tolist())   # the assigned codes learn
    vq.zero_grad(set_to_none=True)
    out["code_loss"].backward()
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0
    vq.zero_grad(set_to_none=True)
    (vq(x).decoded_pixel_values - x).pow(2).mean().backward()
    g = vq.encoder.conv_in.weight.grad
    assert g is None or g.abs().sum() == 0   # the trap the notes describe
    assert torch.equal(vq.encode(x, return_dict=True).image_tokens.view(2, -1), out["indices"])

    before = vq.encoder.conv_in.weight.detach().clone()
    stats = pt.train_vq(vq, steps=2, minutes=None, batch_size=2, log_every=1, progress=False)
    assert stats["steps"] == 2 and len(stats["history"]) == 2
    assert all(0.0 <= h["code_acc"] <= 1.0 and h["code_loss"] > 0 for h in stats["history"])
    assert not torch.equal(before, vq.encoder.conv_in.weight)
    norms = vq.quantize.embedding.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    rec, toks = pt.reconstruct(vq, imgs)
    assert rec.shape == (2, 64, 64, 3) and toks.shape == (2, 64)
    assert 0.0 <= pt.code_agreement(vq, n=4) <= 1.0


def test_codebook_too_small_is_refused():
    vq = pt.build_vq(pt.vq_config(codebook=64), seed=0)
    with pytest.raises(ValueError, match="needs 101"):
        pt.train_vq(vq, steps=1, minutes=None, batch_size=2, progress=False)


def test_the_shipped_vq_gives_every_cell_its_code():
    """The shipped checkpoint's VQ tokenizes held-out scenes exactly (what the generator learns)."""
    from transformers import JanusForConditionalGeneration

    from ospo.shapes.pretrain import packaged_checkpoint

    vq = JanusForConditionalGeneration.from_pretrained(packaged_checkpoint(), dtype=torch.float32).model.vqmodel
    assert pt.code_agreement(vq, n=40) > 0.999
    layouts = w.sample_layouts([w.sample_scene("complex", random.Random(9))] * 4, seed=1)
    rec, toks = pt.reconstruct(vq, w.render_batch(layouts))
    assert np.array_equal(toks, pt.cell_codes(layouts))
