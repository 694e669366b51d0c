"""Klotski: the image is cut into a grid of blocks and every block slides by its own adversarial translation.

Reference: Kaufmann et al., "Testing Robustness Against Unforeseen Adversaries" (arXiv 1908.08016), 2023 code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/klotski.py
(CIFAR-10 defaults: eps from that repository's models/cifar10/cifar10_config.py, step size / steps from models.sh).

    latent     t (B, n, n, 2), one (x, y) translation per block in grid_sample units (n = 8: 4x4-px blocks on
               CIFAR; 1 unit = half the image width)
    render     every pixel samples x at G + t[block of the pixel]; bilinear, zero padding, so content of
               the neighbouring blocks or black padding shows at the seams; G is the reference's grid (2j/W - 1
               sampled with align_corners=False: half a pixel up and left at t = 0); x_adv = x when eps = 0
    constraint t in [-eps, eps] (clamp);  init U[0, eps] (one-sided, as the reference);
               step  t <- t + step_size * sign(grad)

Defaults (CIFAR-10 "medium", linf variant of the config): eps 0.05, 50 steps, step size 0.005.
LEVELS holds low/medium/high. eps may be a float or a (B,) tensor.
When H or W is not a multiple of n, pixel row i belongs to block floor(i n / H) (blocks differ by one pixel).

Deviations from the reference:
  - Examples with eps = 0 get x back, not the reference's half-pixel-shifted render -- the project's rule that
    eps = 0 returns x; for every eps > 0 the render is the reference's.
  - Only the linf constraint of the CIFAR config is implemented (the reference's l2 option is not).

Depends on: attacks/_common.py
"""

import torch

import torch.nn.functional as F

from attacks._common import check_inputs, latent_pgd, per_sample, project_linf, reference_grid

LEVELS = {   # the reference's CIFAR-10 eps low/medium/high; step size and steps are the same at every level
    "low": {"eps": 0.03, "steps": 50, "step_size": 0.005},
    "medium": {"eps": 0.05, "steps": 50, "step_size": 0.005},
    "high": {"eps": 0.1, "steps": 50, "step_size": 0.005},
}
EPS_MEANING = "l_inf on per-block translations (grid_sample units, image spans [-1, 1])"
NUM_BLOCKS = 8   # n x n blocks (reference klotski.py)


def block_flow(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-pixel flow (B, H, W, 2) from per-block translations t (B, n, n, 2): each pixel takes its block's."""
    n = t.shape[1]
    rows = torch.arange(h, device=t.device) * n // h                               # block index of every row
    cols = torch.arange(w, device=t.device) * n // w
    return t[:, rows][:, :, cols]


def klotski(model, x, y, *, eps=0.05, steps=50, step_size=0.005, direction=1, loss_fn=None, generator=None,
            num_blocks=NUM_BLOCKS):
    """Klotski attack: slide each of n x n blocks by a translation in [-eps, eps]^2 (reference klotski.py)."""
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    b, _, h, w = x.shape
    if int(num_blocks) != num_blocks or not 1 <= num_blocks <= min(h, w):
        raise ValueError(f"num_blocks must be an integer in [1, min(H, W)={min(h, w)}], got {num_blocks!r}")
    n = int(num_blocks)
    eps_b = per_sample(eps, x)                                                     # (B, 1, 1, 1)

    grid, on = reference_grid(b, h, w, device=x.device, dtype=x.dtype), eps_b > 0

    def render(t):
        out = F.grid_sample(x, grid + block_flow(t, h, w), mode="bilinear", padding_mode="zeros", align_corners=False)
        # DEVIATION: eps = 0 returns x (the reference's render of t = 0 is not x) -- attack contract, README.md
        return torch.where(on, out, x)

    def project(t):
        return project_linf(t, eps_b)

    t0 = torch.rand((b, n, n, 2), generator=generator, device=x.device, dtype=x.dtype) * eps_b   # U[0, eps]
    return latent_pgd(model, x, y, t0, render, project, steps=int(steps), step_size=step_size,
                      direction=direction, loss_fn=loss_fn, step_rule="sign")
