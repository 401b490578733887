"""Object-weighted SimPO and SFT on visual tokens (OSPO sec. 3.7), as pure functions.

Inputs are token-level log-probs ``[B, N]`` of the stored visual tokens (N = grid**2, fixed
for a model, so no padding mask is needed) and object masks ``[B, N]`` in generation order
(token t is grid cell (t // grid, t % grid)). Outputs are per example ``[B]``; the trainer
averages, weights and adds the terms, and logs the rewards these functions return (the
shape of trl's ``cpo_loss``).

Two reward forms, both followed by ``loss = -log sigmoid(r_w - r_l - gamma)``:

- ``"paper"`` (OSPO sec. 3.7, the default)::

      r(y) = (1/N) * sum_t beta * (1 + alpha * m_t) * log pi(y_t | x, y_<t)

- ``"normalized"`` (the paper's public implementation): a weighted average, so the reward
  keeps the scale of a mean log-prob whatever the mask covers::

      w_t = 1 + alpha * m_t
      r(y) = beta * sum_t w_t * log pi(y_t | ...) / sum_t w_t

  Its preset uses the public code's values: ``beta = 5``, ``gamma = 0.5 * beta`` and masks
  smoothed with a small Gaussian (:func:`smooth_masks`) so they may be soft, in [0, 1].

With ``alpha = 0`` both reduce to SimPO (Meng et al. 2024):
``-log sigmoid(beta * (mean logp_w - mean logp_l) - gamma)``.

No model, file or stage is imported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VARIANTS = ("paper", "normalized")


def object_rewards(logps: torch.Tensor, mask: torch.Tensor, *, alpha: float, beta: float,
                   variant: str = "paper") -> torch.Tensor:
    """The per-example reward r(y) ``[B]`` of token log-probs ``[B, N]`` under object mask ``[B, N]``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    if logps.shape != mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and mask {tuple(mask.shape)} must have the same shape")
    w = 1.0 + alpha * mask.to(logps.dtype)
    if variant == "paper":
        return beta * (w * logps).sum(-1) / logps.shape[-1]
    return beta * (w * logps).sum(-1) / w.sum(-1)


def obj_simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                   chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, *,
                   alpha: float, beta: float, gamma: float, variant: str = "paper"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Object-weighted SimPO: ``(losses [B], chosen_rewards [B], rejected_rewards [B])``.

    ``losses = -log sigmoid(r(y_w) - r(y_l) - gamma)``, computed with ``F.logsigmoid`` (stable
    for large margins of either sign). The rewards carry gradients; detach them to log.
    """
    r_w = object_rewards(chosen_logps, chosen_mask, alpha=alpha, beta=beta, variant=variant)
    r_l = object_rewards(rejected_logps, rejected_mask, alpha=alpha, beta=beta, variant=variant)
    losses = -F.logsigmoid(r_w - r_l - gamma)
    return losses, r_w, r_l


def sft_loss(chosen_logps: torch.Tensor) -> torch.Tensor:
    """Mean token negative log-likelihood of the chosen image, per example ``[B]``.

    N is the same for every example, so the batch mean of these equals the mean over all
    tokens of the batch (the paper's L_SFT).
    """
    return -chosen_logps.mean(-1)


def smooth_masks(mask: torch.Tensor, sigma: float, grid: int) -> torch.Tensor:
    """Gaussian-smooth flattened grid masks ``[B, grid*grid]`` -> soft masks in [0, 1].

    A separable Gaussian (truncated at 4 sigma, as scipy's ``gaussian_filter``) with edge
    replication (scipy's ``mode="nearest"``), written as two 1-d convolutions in torch
    rather than calling scipy: it runs batched on the device the masks already live on
    (no host round trip per step on a GPU) and matches ``scipy.ndimage.gaussian_filter``
    with those settings (tested). ``sigma <= 0`` returns the masks unchanged.
    """
    if sigma <= 0:
        return mask
    B, N = mask.shape
    if N != grid * grid:
        raise ValueError(f"mask has {N} tokens, expected grid**2 = {grid * grid}")
    radius = int(4.0 * sigma + 0.5)  # scipy: int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(device=mask.device, dtype=torch.float32)
    img = mask.to(torch.float32).view(B, 1, grid, grid)
    img = F.pad(img, (radius, radius, 0, 0), mode="replicate")
    img = F.conv2d(img, k.view(1, 1, 1, -1))
    img = F.pad(img, (0, 0, radius, radius), mode="replicate")
    img = F.conv2d(img, k.view(1, 1, -1, 1))
    return img.reshape(B, N).clamp_(0.0, 1.0).to(mask.dtype if mask.is_floating_point() else torch.float32)

