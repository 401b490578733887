"""Loss arithmetic, written out by hand (the style of torchtune's test_dpo_loss)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ospo.losses import obj_simpo_loss, object_rewards, sft_loss, smooth_masks

# One pair, N = 4 tokens.
LOGP_W = torch.tensor([[-1.0, -2.0, -1.0, -2.0]])
MASK_W = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
LOGP_L = torch.tensor([[-2.0, -2.0, -2.0, -2.0]])
MASK_L = torch.tensor([[0.0, 0.0, 1.0, 1.0]])


def test_paper_variant_by_hand():
    """alpha = 1, beta = 0.5, gamma = 0.25.

    chosen:   w = 1 + m = [2, 1, 1, 2];  sum w*logp = -2 - 2 - 1 - 4 = -9
              r_w = (1/N) * beta * (-9) = 0.5 * -9 / 4 = -1.125
    rejected: w = [1, 1, 2, 2];          sum w*logp = -2 - 2 - 4 - 4 = -12
              r_l = 0.5 * -12 / 4 = -1.5
    z = r_w - r_l - gamma = 0.375 - 0.25 = 0.125
    loss = -log sigmoid(0.125) = log(1 + exp(-0.125)) = 0.632599...
    """
    losses, r_w, r_l = obj_simpo_loss(LOGP_W, LOGP_L, MASK_W, MASK_L, alpha=1.0, beta=0.5, gamma=0.25)
    assert r_w.item() == pytest.approx(-1.125)
    assert r_l.item() == pytest.approx(-1.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.125)))
    assert losses.item() == pytest.approx(0.6325991, abs=1e-6)


def test_normalized_variant_by_hand():
    """alpha = 1, beta = 0.5, gamma = 0.25.

    chosen:   sum w = 6, sum w*logp = -9   -> r_w = 0.5 * -9 / 6  = -0.75
    rejected: sum w = 6, sum w*logp = -12  -> r_l = 0.5 * -12 / 6 = -1.0
    z = -0.75 + 1.0 - 0.25 = 0  -> loss = -log sigmoid(0) = log 2
    """
    losses, r_w, r_l = obj_simpo_loss(LOGP_W, LOGP_L, MASK_W, MASK_L, alpha=1.0, beta=0.5, gamma=0.25,
                                      variant="normalized")
    assert r_w.item() == pytest.approx(-0.75)
    assert r_l.item() == pytest.approx(-1.0)
    assert losses.item() == pytest.approx(math.log(2.0))


def test_normalized_with_soft_mask_by_hand():
    """Soft mask m = [0.5, 0, 0, 0], alpha = 2, beta = 5: w = [2, 1, 1, 1], sum w = 5.
    chosen: sum w*logp = -2 - 2 - 1 - 2 = -7 -> r_w = 5 * -7 / 5 = -7."""
    r = object_rewards(LOGP_W, torch.tensor([[0.5, 0.0, 0.0, 0.0]]), alpha=2.0, beta=5.0, variant="normalized")
    assert r.item() == pytest.approx(-7.0)


@pytest.mark.parametrize("variant", ["paper", "normalized"])
def test_alpha_zero_is_simpo_as_trl_computes_it(variant):
    """alpha = 0: both variants are SimPO. TRL's CPOTrainer (loss_type="simpo") computes
        logits = (avg_logp_w - avg_logp_l) - gamma / beta
        loss   = -logsigmoid(beta * logits)
    i.e. -logsigmoid(beta * (avg_logp_w - avg_logp_l) - gamma). Written out here per row."""
    g = torch.Generator().manual_seed(0)
    logp_w = -torch.rand(3, 16, generator=g) * 5
    logp_l = -torch.rand(3, 16, generator=g) * 5
    masks = (torch.rand(3, 16, generator=g) > 0.5).float()
    beta, gamma = 2.0, 1.0
    losses, r_w, r_l = obj_simpo_loss(logp_w, logp_l, masks, 1 - masks, alpha=0.0, beta=beta, gamma=gamma,
                                      variant=variant)
    for i in range(3):
        avg_w = sum(logp_w[i].tolist()) / 16
        avg_l = sum(logp_l[i].tolist()) / 16
        z = beta * (avg_w - avg_l) - gamma
        trl = -math.log(1.0 / (1.0 + math.exp(-z)))
        assert losses[i].item() == pytest.approx(trl, abs=1e-6)
        assert r_w[i].item() == pytest.approx(beta * avg_w, abs=1e-6)
        assert r_l[i].item() == pytest.approx(beta * avg_l, abs=1e-6)
        # and torch's own formula as TRL writes it
        ref = -F.logsigmoid(beta * ((torch.tensor(avg_w) - torch.tensor(avg_l)) - gamma / beta))
        assert losses[i].item() == pytest.approx(ref.item(), abs=1e-6)


def test_object_tokens_get_one_plus_alpha_times_the_gradient():
    """Paper variant: d loss / d logp_t = -(1 - sigmoid(z)) * beta * (1 + alpha m_t) / N, so an
    object token's chosen gradient is (1 + alpha) times a background token's.

    alpha = 3, beta = 0.5, gamma = 0: chosen w = [4, 1, 1, 4], sum w*logp = -4 - 2 - 1 - 8 = -15,
    r_w = 0.5 * -15 / 4 = -1.875; rejected w = [1, 1, 4, 4], sum = -2 - 2 - 8 - 8 = -20,
    r_l = -2.5; z = 0.625; background token: -(1 - sigmoid(0.625)) * 0.5 / 4."""
    logp_w = LOGP_W.clone().requires_grad_(True)
    losses, _, _ = obj_simpo_loss(logp_w, LOGP_L, MASK_W, MASK_L, alpha=3.0, beta=0.5, gamma=0.0)
    losses.sum().backward()
    g = logp_w.grad[0]
    assert (g < 0).all()  # raising a chosen log-prob lowers the loss
    assert (g[0] / g[1]).item() == pytest.approx(4.0)
    s = 1 / (1 + math.exp(-0.625))
    assert g[1].item() == pytest.approx(-(1 - s) * 0.5 / 4, abs=1e-7)


def test_batch_is_per_example_and_large_margins_are_stable():
    logp_w = torch.tensor([[-1.0, -1.0], [-100.0, -100.0]])
    logp_l = torch.tensor([[-100.0, -100.0], [-1.0, -1.0]])
    zeros = torch.zeros(2, 2)
    losses, r_w, r_l = obj_simpo_loss(logp_w, logp_l, zeros, zeros, alpha=1.0, beta=5.0, gamma=0.0)
    assert losses.shape == (2,)
    # z = 5 * 99 = 495: loss ~ exp(-495) ~ 0; z = -495: loss ~ 495 (no inf, no nan)
    assert losses[0].item() == pytest.approx(0.0, abs=1e-12)
    assert losses[1].item() == pytest.approx(495.0)


def test_sft_is_mean_token_nll():
    """chosen logps [-1, -2, -1, -2] -> NLL mean = (1 + 2 + 1 + 2) / 4 = 1.5;
    second row [-0.5, -0.5, -0.5, -4.5] -> 6 / 4 = 1.5 as well; batch mean 1.5."""
    logps = torch.tensor([[-1.0, -2.0, -1.0, -2.0], [-0.5, -0.5, -0.5, -4.5]])
    out = sft_loss(logps)
    assert out.tolist() == pytest.approx([1.5, 1.5])


def test_smooth_masks_matches_scipy_and_stays_in_unit_interval():
    from scipy.ndimage import gaussian_filter

    rng = np.random.RandomState(0)
    grid = 8
    m = (rng.rand(2, grid, grid) > 0.6).astype(np.float32)
    out = smooth_masks(torch.from_numpy(m.reshape(2, -1)), 1.0, grid)
    for i in range(2):
        ref = gaussian_filter(m[i].astype(np.float64), sigma=1.0, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(out[i].numpy().reshape(grid, grid), ref, atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(smooth_masks(torch.ones(1, 4), 0.0, 2), torch.ones(1, 4))


def test_bad_inputs():
    with pytest.raises(ValueError):
        object_rewards(LOGP_W, MASK_W, alpha=1, beta=1, variant="nope")
    with pytest.raises(ValueError):
        object_rewards(LOGP_W, MASK_W[:, :2], alpha=1, beta=1)
