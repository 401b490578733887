"""ShapesWorld pretraining, VQ stage: the training forward passes gradient to the encoder
(the stock forward does not), stock ``encode`` picks the tokens training picked, and a few
steps move the weights while keeping the codebook unit-normalized."""

from __future__ import annotations

import random

import torch

from ospo.shapes import vq as pt


def test_vq_training_forward_and_steps():
    vq = pt.build_vq(pt.vq_config(channels=32, levels=4, codebook=32), seed=0)
    vq.train()
    imgs, _ = pt.scene_batch(random.Random(0), 2)
    x = pt.to_pixels(imgs)
    out = pt.vq_forward(vq, x)
    pt.recon_loss(out["recon"], x, 5.0).backward()
    assert vq.encoder.conv_in.weight.grad is not None and vq.encoder.conv_in.weight.grad.abs().sum() > 0
    vq.zero_grad(set_to_none=True)
    (vq(x).decoded_pixel_values - x).pow(2).mean().backward()
    g = vq.encoder.conv_in.weight.grad
    assert g is None or g.abs().sum() == 0   # the trap the notes describe
    assert torch.equal(vq.encode(x, return_dict=True).image_tokens.view(2, -1), out["indices"])

    before = vq.encoder.conv_in.weight.detach().clone()
    stats = pt.train_vq(vq, steps=2, minutes=None, batch_size=2, reset_every=1, progress=False)
    assert stats["steps"] == 2 and len(stats["history"]) == 2
    assert not torch.equal(before, vq.encoder.conv_in.weight)
    norms = vq.quantize.embedding.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    rec, toks = pt.reconstruct(vq, imgs)
    assert rec.shape == (2, 64, 64, 3) and toks.shape == (2, 64)
