"""Glitch attack: horizontal bands of each colour channel slide sideways, like a torn video signal (Kaufmann et al.
2023, "Testing Robustness Against Unforeseen Adversaries", arXiv 1908.08016; reference code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/glitch.py, whose CIFAR-10 levels take
eps from models/cifar10/cifar10_config.py and step size / steps from models.sh).

Latent:  shifts v (B, C, L), one horizontal shift per (image, colour channel, horizontal band), L = num_lines
         (CIFAR 16 -> bands of 2 rows), in grid_sample units (the image spans [-1, 1]).
Render:  optional greying x <- (1 - g) x + g * 0.87 (g = grey_strength, 0 in the reference configs);
         channel c of row i is resampled at (column + v[c, band(i)], row): bilinear, reflection padding, on the
         reference's grid (2j/W - 1 sampled with align_corners=False: half a pixel up and left even at v = 0, a
         slight blur); x_adv = x for examples with eps = 0.
         All channels are folded into the batch and sampled by ONE grid_sample call (the reference loops over
         channels; same result).
Constraint: ||v||_inf <= eps per example.
Init:    v ~ U[0, eps] (one-sided, as the reference).
Step:    v <- clamp(v + step_size * direction * sign(grad_v), -eps, eps)          (latent_pgd, step_rule "sign")

Defaults: the CIFAR-10 "medium" level of the reference: eps 0.05 (about 0.8 px), steps 60,
step_size 0.0025, 16 lines, grey strength 0. LEVELS holds low / medium / high (only eps changes).

Deviations from the reference:
- Examples with eps = 0 get x back, not the reference's half-pixel-shifted render -- the project's rule that
  eps = 0 returns x; for every eps > 0 the render is the reference's.
- Band of row i = floor(i * L / H), which also covers H not divisible by L.

eps may be a float or a per-example (B,) tensor; direction +1 (maximise the loss) or -1, or a (B,) tensor.

Depends on: attacks/_common.py
"""

import torch
import torch.nn.functional as F

from attacks._common import check_inputs, latent_pgd, per_sample, reference_grid

# CIFAR-10 levels of the reference (eps: models/cifar10/cifar10_config.py; step size / steps: models.sh)
LEVELS = {
    "low": {"eps": 0.03, "steps": 60, "step_size": 0.0025},
    "medium": {"eps": 0.05, "steps": 60, "step_size": 0.0025},
    "high": {"eps": 0.1, "steps": 60, "step_size": 0.0025},
}
EPS_MEANING = "l_inf on per-band, per-channel horizontal shifts (grid_sample units)"
GREY = 0.87   # the reference's greying target value


def render(x: torch.Tensor, shifts: torch.Tensor, *, grey_strength: float = 0.0, base=None) -> torch.Tensor:
    """Shift every horizontal band of every channel by its own amount; shifts (B, C, L) in grid units; base: the
    reference grid (B * C, H, W, 2), built if None."""
    b, c, h, w = x.shape
    if grey_strength:
        x = (1 - grey_strength) * x + grey_strength * GREY
    band = torch.arange(h, device=x.device) * shifts.shape[-1] // h               # (H,) band of each row
    dx = shifts[:, :, band].reshape(b * c, h, 1, 1).expand(b * c, h, w, 1)        # (B*C, H, W, 1)
    base = reference_grid(b * c, h, w, device=x.device, dtype=x.dtype) if base is None else base
    grid = base + torch.cat([dx, torch.zeros_like(dx)], -1)
    out = F.grid_sample(x.reshape(b * c, 1, h, w), grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    return out.view(b, c, h, w).clamp(0.0, 1.0)


def glitch(model, x, y, *, eps=0.05, steps=60, step_size=0.0025, num_lines=16, grey_strength=0.0, direction=1,
           loss_fn=None, generator=None):
    """Glitch attack: sign-step PGD on l_inf-bounded per-band channel shifts; see the module docstring."""
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(step_size, torch.Tensor) and not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size!r}")
    if int(num_lines) != num_lines or not 1 <= num_lines <= x.shape[2]:
        raise ValueError(f"num_lines must be an integer in [1, H={x.shape[2]}], got {num_lines!r}")
    if not 0 <= grey_strength <= 1:
        raise ValueError(f"grey_strength must be in [0, 1], got {grey_strength!r}")
    b, c = x.shape[:2]
    eps_b = per_sample(eps, x).view(b, 1, 1)                                       # (B, 1, 1)
    shifts = eps_b * torch.rand(b, c, int(num_lines), generator=generator, device=x.device, dtype=x.dtype)

    on, base = eps_b.view(b, 1, 1, 1) > 0, reference_grid(b * c, *x.shape[2:], device=x.device, dtype=x.dtype)

    def project(v):
        return torch.maximum(torch.minimum(v, eps_b), -eps_b)

    # DEVIATION: eps = 0 returns x (the reference's render of a zero shift is not x) -- attack contract, README.md
    return latent_pgd(model, x, y, shifts, lambda v: torch.where(on, render(x, v, grey_strength=grey_strength, base=base), x),
                      project, steps=int(steps), step_size=step_size, direction=direction, loss_fn=loss_fn,
                      step_rule="sign")
