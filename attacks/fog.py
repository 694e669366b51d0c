"""Fog: an adversarial diamond-square (plasma fractal) fog map blended over the image.

Reference: Kaufmann et al., "Testing Robustness Against Unforeseen Adversaries" (arXiv 1908.08016), 2023 code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/fog.py
(CIFAR-10 defaults: eps from that repository's models/cifar10/cifar10_config.py, step size / steps from models.sh).

    latent   displacements v: for every level i = 0 .. log2(S) - 1 (S = image size rounded up to a power of two,
             CIFAR: 32, 5 levels) three sets of 2^i x 2^i values (square centres, two diamond sets);
             stored flat as (B, 3, N), N = sum_i 4^i (CIFAR: 3 * 341 = 1023 values per image)
    render   diamond-square on an S x S periodic map that starts at 0; at level i (stride s = S / 2^i):
               square centres = mean of their 4 corners            + w_i * v
               diamonds       = mean of their 4 (wrapped) neighbours + w_i * v
             with w_0 = 1, w_i = w_{i-1} / wibble_decay (3).
             fog = clamp(|map|, 0, 1) centre-cropped to H x W;  x_adv = x * (1 - fog) + fog * g,
             g = (0.485, 0.45, 0.406) (roughly the ImageNet mean colour)
    constraint  v in [-eps, eps] (clamp);  init U[0, eps];  step  v <- v + step_size * sign(grad)

Defaults (CIFAR-10 "medium"): eps 0.4, 40 steps, step size 0.05, wibble decay 3.
LEVELS holds low/medium/high. eps = 0 gives a zero map, i.e. x exactly. eps may be a float or a (B,) tensor.
For one channel (C != 3) the grey is the mean of g.

Deviations from the reference: none in the render or the constraint. The map is built level by level by
interleaving (no in-place slice assignment), which is the same arithmetic; the latent is detached every step.

Depends on: attacks/_common.py
"""

import math

import torch

from attacks._common import check_inputs, device_constant, latent_pgd, per_sample, project_linf

LEVELS = {   # the reference's CIFAR-10 eps low/medium/high; step size and steps are the same at every level
    "low": {"eps": 0.3, "steps": 40, "step_size": 0.05},
    "medium": {"eps": 0.4, "steps": 40, "step_size": 0.05},
    "high": {"eps": 0.5, "steps": 40, "step_size": 0.05},
}
EPS_MEANING = "l_inf on the diamond-square displacements (fog intensity units)"
FOG_COLOUR = (0.485, 0.45, 0.406)   # reference fog.py
WIBBLE_DECAY = 3.0                  # w_i = w_{i-1} / 3 (reference fog.py)


def fog_levels(h: int, w: int) -> int:
    """Number of diamond-square levels log2(S), S = max(H, W) rounded up to a power of two."""
    return max(1, math.ceil(math.log2(max(h, w))))


def diamond_square(v: torch.Tensor, levels: int, wibble_decay: float = WIBBLE_DECAY) -> torch.Tensor:
    """Differentiable periodic diamond-square map (B, S, S), S = 2^levels, from displacements v (B, 3, N)."""
    b = v.shape[0]
    grid = v.new_zeros(b, 1, 1)        # level 0: a single corner value, 0
    offset, weight = 0, 1.0
    for i in range(levels):            # loop over log2(S) levels, not over images
        n = 2 ** i
        v_sq, v_a, v_b = v[:, :, offset:offset + n * n].reshape(b, 3, n, n).unbind(1)   # (B, n, n) each
        offset += n * n
        # corners M[k, l] sit at (k s, l s); wrapped neighbours via roll (the map is periodic)
        right = torch.roll(grid, -1, dims=2)
        down = torch.roll(grid, -1, dims=1)
        centre = (grid + right + down + torch.roll(down, -1, dims=2)) / 4 + weight * v_sq     # at (ks + s/2, ls + s/2)
        # diamond A at (ks, ls + s/2): corners left/right, centres above/below
        dia_a = (grid + right + centre + torch.roll(centre, 1, dims=1)) / 4 + weight * v_a
        # diamond B at (ks + s/2, ls): corners above/below, centres left/right
        dia_b = (grid + down + centre + torch.roll(centre, 1, dims=2)) / 4 + weight * v_b
        # interleave to the finer grid: new[2k + a, 2l + c] = [[M, A], [B, centre]][a][c]
        top = torch.stack([grid, dia_a], dim=-1)                     # (B, n, n, 2)
        bottom = torch.stack([dia_b, centre], dim=-1)
        grid = torch.stack([top, bottom], dim=2).reshape(b, 2 * n, 2 * n)
        weight /= wibble_decay
    return grid


def fog(model, x, y, *, eps=0.4, steps=40, step_size=0.05, direction=1, loss_fn=None, generator=None,
        wibble_decay=WIBBLE_DECAY):
    """Fog attack: x_adv = x (1 - fog) + fog g, fog = |diamond-square map| with displacements in [-eps, eps]."""
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not wibble_decay > 0:
        raise ValueError(f"wibble_decay must be > 0, got {wibble_decay!r}")
    b, c, h, w = x.shape
    eps_b = per_sample(eps, x).view(b, 1, 1)
    levels = fog_levels(h, w)
    size = 2 ** levels
    top, left = (size - h) // 2, (size - w) // 2
    n_values = sum(4 ** i for i in range(levels))
    colour = device_constant("fog.colour", lambda: torch.tensor(FOG_COLOUR, dtype=torch.float64), x.device, x.dtype)
    colour = (colour if c == 3 else colour.mean().expand(c)).view(1, c, 1, 1)

    def render(v):
        fog_map = diamond_square(v, levels, wibble_decay).abs().clamp(0.0, 1.0)
        fog_map = fog_map[:, top:top + h, left:left + w].unsqueeze(1)       # centre crop, (B, 1, H, W)
        return x * (1 - fog_map) + fog_map * colour

    def project(v):
        return project_linf(v, eps_b)

    v0 = torch.rand((b, 3, n_values), generator=generator, device=x.device, dtype=x.dtype) * eps_b   # U[0, eps]
    return latent_pgd(model, x, y, v0, render, project, steps=int(steps), step_size=step_size,
                      direction=direction, loss_fn=loss_fn, step_rule="sign")
