"""Prison: grey vertical bars are drawn over the image and adversarially brightened.

Reference: Kaufmann et al., "Testing Robustness Against Unforeseen Adversaries" (arXiv 1908.08016), 2023 code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/prison.py
(CIFAR-10 defaults: eps from that repository's models/cifar10/cifar10_config.py, step size / steps from models.sh).

    structure  vertical bars centred at columns arange(floor(W/n)//2, W - floor(W/n)//2, W//n) (n = num_bars = 8),
               each covering columns centre - width//2 .. centre + width//2 (width 1). CIFAR: columns 2, 6, ..., 26,
               i.e. 7 one-pixel bars (the reference draws 7 of the 8 requested; kept). The same for every image.
    latent     b (B, C, H, W), used on bar pixels only
    render     x_adv = clamp(x + g * M * (0.5 - x) + M * b, 0, 1),  M = bar mask,  g = 1 if eps > 0 else 0
               (for eps > 0: bar pixels are set to grey 0.5 and brightened by b, the reference render)
    constraint b in [0, eps] (brightening only);  init zeros;  step  b <- b + step_size * sign(grad)

Defaults (CIFAR-10 "medium"): eps 0.03, 20 steps, step size 0.0015. LEVELS holds low/medium/high.
Reach 20 * 0.0015 = 0.03, so "high" (0.1) behaves like "medium" (reference property). eps may be a float or a
(B,) tensor.

Deviations from the reference:
  - The grey bars are drawn only for samples with eps > 0 (gate g) -- the project's rule that eps = 0 returns x;
    for every eps > 0 the render is the reference's.
  - A final clamp to [0, 1] (the reference has none; it is not needed at the default budgets).

Depends on: attacks/_common.py
"""

import torch

from attacks._common import check_inputs, latent_pgd, per_sample

LEVELS = {   # the reference's CIFAR-10 eps low/medium/high; step size and steps are the same at every level
    "low": {"eps": 0.01, "steps": 20, "step_size": 0.0015},
    "medium": {"eps": 0.03, "steps": 20, "step_size": 0.0015},
    "high": {"eps": 0.1, "steps": 20, "step_size": 0.0015},
}
EPS_MEANING = "per-pixel brightening of the (grey) bar pixels, in [0, eps]"
GREY = 0.5            # bar pixels are set to mid-grey (reference prison.py)
NUM_BARS = 8          # CIFAR config: 8 bars requested (7 drawn)
BAR_WIDTH = 1         # CIFAR config: 1 px


def bar_mask(h: int, w: int, num_bars: int = NUM_BARS, bar_width: int = BAR_WIDTH, device=None, dtype=None):
    """Vertical bar mask (1, 1, H, W): 1 on the reference's bar columns, 0 elsewhere."""
    gap = w // num_bars
    centres = torch.arange(gap // 2, w - gap // 2, gap, device=device)               # (n_drawn,)
    cols = torch.arange(w, device=device)
    on = ((cols[None, :] - centres[:, None]).abs() <= bar_width // 2).any(0)       # (W,)
    return on.to(dtype or torch.float32).view(1, 1, 1, w).expand(1, 1, h, w)


def prison(model, x, y, *, eps=0.03, steps=20, step_size=0.0015, direction=1, loss_fn=None, generator=None,
           num_bars=NUM_BARS, bar_width=BAR_WIDTH):
    """Prison attack: grey bars brightened per pixel by b in [0, eps], as the reference. Deterministic (zero init)."""
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if int(num_bars) != num_bars or not 1 <= num_bars <= x.shape[3]:
        raise ValueError(f"num_bars must be an integer in [1, W={x.shape[3]}], got {num_bars!r}")
    if int(bar_width) != bar_width or bar_width < 1:
        raise ValueError(f"bar_width must be an integer >= 1, got {bar_width!r}")
    eps_b = per_sample(eps, x)                                                    # (B, 1, 1, 1)
    mask = bar_mask(x.shape[2], x.shape[3], int(num_bars), int(bar_width), device=x.device, dtype=x.dtype)
    # DEVIATION: bars gated on eps > 0 -- eps = 0 must return x (attack contract, README.md)
    x_barred = x + (eps_b > 0).to(x.dtype) * mask * (GREY - x)

    def render(bright):
        return x_barred + mask * bright

    def project(bright):
        return torch.minimum(bright.clamp_min(0.0), eps_b) * mask

    return latent_pgd(model, x, y, torch.zeros_like(x), render, project, steps=int(steps), step_size=step_size,
                      direction=direction, loss_fn=loss_fn, step_rule="sign")
