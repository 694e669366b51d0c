"""Elastic attack: a smooth, low-resolution flow field warps the image (Kaufmann et al. 2023, "Testing Robustness
Against Unforeseen Adversaries", arXiv 1908.08016; reference code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/elastic.py, whose CIFAR-10 levels take
eps from models/cifar10/cifar10_config.py and step size / steps from models.sh).

Latent:  a flow f (B, 2, ceil(H/s), ceil(W/s)), s = upsample_factor (CIFAR 2 -> 16 x 16), in grid_sample units
         (the image spans [-1, 1]); channel 0 moves along x (columns), channel 1 along y (rows).
Render:  F = bicubic upsampling of f to H x W (align_corners=False, no extra smoothing, as the 2023 reference);
         x_adv = bilinear sample of x at G + F, zero padding (content pulled from outside is black), with the
         reference's grid convention: G = linspace(-1, 1) grid sampled with align_corners=False, so even a zero
         flow zooms out by W / (W - 1) about the centre and half-blackens the 1-px frame (CIFAR: 32/31);
         x_adv = x for examples with eps = 0.
Constraint: ||f||_2 <= eps per example over all 2 * (H/s) * (W/s) values (CIFAR: 512), yet the steps are SIGN steps
         (as the reference; one CIFAR step has l_2 length 0.006 * sqrt(512) = 0.136, the ball saturates fast).
Init:    f ~ U[-1, 1], then projected onto the l_2 ball: a random direction with norm eps (the raw norm is larger).
Step:    f <- P_{||.||_2 <= eps}(f + step_size * direction * sign(grad_f))          (latent_pgd, step_rule "sign")

Defaults: the CIFAR-10 "medium" level of the reference: eps 0.25, steps 30, step_size 0.006,
upsample factor 2. LEVELS holds low / medium / high (only eps changes between levels).

Deviations from the reference:
- Examples with eps = 0 get x back (gate g), not the reference's zoomed-out render of a zero flow -- the
  project's rule that eps = 0 returns x; for every eps > 0 the render is the reference's. (A consistent
  align_corners=True grid instead would make the attack 4-7 accuracy points weaker than the reference on CPU-scale
  PGD models, measured with tests/upstream_semantic_check.py: the zoom-out alone costs 3 points.)
- H or W not divisible by upsample_factor: the flow has ceil(H/s) x ceil(W/s) cells (the reference assumes
  divisibility).

eps may be a float or a per-example (B,) tensor; direction +1 (maximise the loss) or -1, or a (B,) tensor.

Depends on: attacks/_common.py
"""

import math

import torch
import torch.nn.functional as F

from attacks._common import check_inputs, identity_grid, latent_pgd, per_sample, project_l2

# CIFAR-10 levels of the reference (eps: models/cifar10/cifar10_config.py; step size / steps: models.sh)
LEVELS = {
    "low": {"eps": 0.1, "steps": 30, "step_size": 0.006},
    "medium": {"eps": 0.25, "steps": 30, "step_size": 0.006},
    "high": {"eps": 0.5, "steps": 30, "step_size": 0.006},
}
EPS_MEANING = "l_2 (per image) on the low-res flow, grid_sample units (image spans [-1, 1])"


def render(x: torch.Tensor, flow: torch.Tensor, base=None) -> torch.Tensor:
    """Warp x by the bicubically upsampled flow (B, 2, h, w), as the reference: a linspace(-1, 1) grid (`base`, built
    if None) sampled with align_corners=False (so a zero flow zooms out by W / (W - 1) and half-blackens the frame)."""
    b, _, h, w = x.shape
    base = identity_grid(b, h, w, device=x.device, dtype=x.dtype) if base is None else base
    full = F.interpolate(flow, size=(h, w), mode="bicubic", align_corners=False)   # (B, 2, H, W)
    return F.grid_sample(x, base + full.permute(0, 2, 3, 1), mode="bilinear", padding_mode="zeros",
                         align_corners=False).clamp(0.0, 1.0)


def elastic(model, x, y, *, eps=0.25, steps=30, step_size=0.006, upsample_factor=2, direction=1, loss_fn=None,
            generator=None):
    """Elastic attack: sign-step PGD on an l_2-bounded low-resolution flow field; see the module docstring."""
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(step_size, torch.Tensor) and not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size!r}")
    if int(upsample_factor) != upsample_factor or upsample_factor < 1:
        raise ValueError(f"upsample_factor must be an integer >= 1, got {upsample_factor!r}")
    b, _, h, w = x.shape
    eps_b = per_sample(eps, x)                                                  # (B, 1, 1, 1)
    shape = (b, 2, math.ceil(h / upsample_factor), math.ceil(w / upsample_factor))
    flow = 2 * torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype) - 1   # U[-1, 1]

    on, base = eps_b > 0, identity_grid(b, h, w, device=x.device, dtype=x.dtype)

    def project(f):
        return project_l2(f, eps_b)

    # DEVIATION: eps = 0 returns x (the reference's render of a zero flow is not x) -- attack contract, README.md
    return latent_pgd(model, x, y, flow, lambda f: torch.where(on, render(x, f, base), x), project, steps=int(steps),
                      step_size=step_size, direction=direction, loss_fn=loss_fn, step_rule="sign")
