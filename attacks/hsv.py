"""HSV: smooth adversarial per-pixel offsets of hue, saturation and value.

Reference: Kaufmann et al., "Testing Robustness Against Unforeseen Adversaries" (arXiv 1908.08016), 2023 code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/hsv.py
(CIFAR-10 defaults: eps from that repository's models/cifar10/cifar10_config.py, step size / steps from models.sh).

    latent   offsets o (B, 3, H, W) for the H, S and V channels
    render   o~ = Gaussian blur of o (kernel 3, sigma 3: nearly a 3x3 box; reflect padding)
             hsv = rgb_to_hsv(x)               (clean image only: a constant, never differentiated)
             x_adv = clamp(hsv_to_rgb(clamp(hsv + o~, 0, 1)), 0, 1)
             hue in [0, 1] is clamped, not wrapped (as the reference); hsv_to_rgb is the standard 6-sector formula
             (sector = floor(6 h) mod 6), piecewise linear, so autograd gives its a.e. gradient
    constraint o in [-eps, eps] (clamp);  init U[0, eps];  step  o <- o + step_size * sign(grad)

Defaults (CIFAR-10 "medium"): eps 0.02, 20 steps, step size 0.003. LEVELS holds low/medium/high.
eps = 0 gives hsv_to_rgb(rgb_to_hsv(x)) = x (to float rounding). eps may be a float or a (B,) tensor.
Needs C = 3 (RGB).

Deviations from the reference: none.

Depends on: attacks/_common.py
"""

import torch

from attacks._common import check_inputs, device_constant, gaussian_blur, latent_pgd, per_sample, project_linf

LEVELS = {   # the reference's CIFAR-10 eps low/medium/high; step size and steps are the same at every level
    "low": {"eps": 0.01, "steps": 20, "step_size": 0.003},
    "medium": {"eps": 0.02, "steps": 20, "step_size": 0.003},
    "high": {"eps": 0.03, "steps": 20, "step_size": 0.003},
}
EPS_MEANING = "l_inf on per-pixel H, S, V offsets (before the 3x3 smoothing)"
SMOOTH_SIGMA, SMOOTH_RADIUS = 3.0, 1   # kernel 3, sigma 3 (reference hsv.py)

# 6-sector formula: (R, G, B) of sector i as indices into (v, p, q, t)
#   0: (v, t, p)  1: (q, v, p)  2: (p, v, t)  3: (p, q, v)  4: (t, p, v)  5: (v, p, q)
_SECTORS = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV in [0, 1]; hue from the max channel, grey pixels get hue 0. No grad."""
    with torch.no_grad():
        r, g, b = rgb.unbind(1)
        v, argmax = rgb.max(1)
        chroma = v - rgb.min(1).values
        safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
        h6 = torch.where(argmax == 0, ((g - b) / safe) % 6,
                         torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4))
        hue = torch.where(chroma > 0, h6 / 6, torch.zeros_like(h6))
        sat = torch.where(v > 0, chroma / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
        return torch.stack([hue, sat, v], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) HSV in [0, 1] -> RGB, the standard 6-sector formula (differentiable a.e.)."""
    h, s, v = hsv.unbind(1)
    h6 = h * 6
    sector_f = torch.floor(h6)
    f = h6 - sector_f                                       # position inside the sector, in [0, 1)
    sector = sector_f.long() % 6                            # hue 1 is sector 0 again
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    comps = torch.stack([v, p, q, t], 1)                    # (B, 4, H, W)
    table = device_constant("hsv.sectors", lambda: torch.tensor(_SECTORS), hsv.device)   # (6, 3), once per device
    index = table[sector].permute(0, 3, 1, 2)               # (B, 3, H, W): which of (v, p, q, t) per channel
    return comps.gather(1, index)


def hsv(model, x, y, *, eps=0.02, steps=20, step_size=0.003, direction=1, loss_fn=None, generator=None):
    """HSV attack: add Gaussian-smoothed offsets in [-eps, eps] to the H, S, V channels of x (reference hsv.py)."""
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if x.shape[1] != 3:
        raise ValueError(f"hsv needs RGB images (C = 3), got C = {x.shape[1]}")
    eps_b = per_sample(eps, x)                                                     # (B, 1, 1, 1)
    x_hsv = rgb_to_hsv(x)                                                          # constant: never differentiated

    def render(offsets):
        smooth = gaussian_blur(offsets, SMOOTH_SIGMA, SMOOTH_RADIUS)
        return hsv_to_rgb((x_hsv + smooth).clamp(0.0, 1.0))

    def project(offsets):
        return project_linf(offsets, eps_b)

    o0 = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * eps_b   # U[0, eps]
    return latent_pgd(model, x, y, o0, render, project, steps=int(steps), step_size=step_size,
                      direction=direction, loss_fn=loss_fn, step_rule="sign")
