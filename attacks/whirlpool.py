"""Whirlpool: the image is resampled through several adversarially strong swirls.

Reference: Kaufmann et al., "Testing Robustness Against Unforeseen Adversaries" (arXiv 1908.08016), 2023 code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/whirlpool.py
(CIFAR-10 defaults: eps from that repository's models/cifar10/cifar10_config.py, step size / steps from models.sh).

    structure  K = 8 whirlpool centres c_k per image, uniform in [-1, 1]^2 (grid_sample units)
    latent     strengths s (B, K); |s_k| is used
    render     for every pixel p (the reference's grid 2j/W - 1) and whirlpool k, with d = p - c_k, r = |d|:
                 phi_k = (|s_k| + s_min) * exp(-r / rho)           (scikit-image swirl; s_min 0.5,
                                                                   rho = ln 2 * radius / 5, radius 0.5)
                 Delta_k = R(phi_k) d - d                          (displacement of p rotated by phi_k about c_k)
               Delta = elementwise MAX over k of Delta_k, separately for x and y (as the reference combines the
               whirlpools: not a sum; far from every centre Delta ~ 0, so negative displacements are clipped at 0
               wherever the other whirlpools are far: a one-sided swirl, reference behaviour, kept)
               x_adv = bilinear resample of x at p + Delta, zero padding, align_corners=False (as the
               reference: half a pixel up and left even at Delta = 0); x_adv = x for examples with eps = 0
    constraint l2 ball of radius eps per image on s;  init eps * u * s0 / |s0|_2, s0 ~ U[0, 1]^K, u ~ U(0, 1);
               step  s <- P_eps(s + step_size * grad / |grad|_2)

Rotating d by phi about c_k is the reference's c_k + r (cos theta, sin theta), theta = phi + atan2(d), written
without atan2 (same values; exact zero displacement at phi = 0 and no singularity at r = 0).

Defaults (CIFAR-10 "medium"): eps 100 (radians of peak rotation, l2 over the 8 strengths), 50 steps,
step size 16. LEVELS holds low/medium/high. eps may be a float or a (B,) tensor.

Deviations from the reference:
  - Examples with eps = 0 get x back (the reference still swirls them by s_min, on its half-pixel grid) -- the
    project's rule that eps = 0 returns x; for every eps > 0 the render is the reference's.
  - The init's random scale u is drawn per image, not once per batch as in the reference -- so an image's attack
    does not depend on the rest of its batch.

Depends on: attacks/_common.py
"""

import math

import torch
import torch.nn.functional as F

from attacks._common import check_inputs, latent_pgd, per_sample, project_l2, reference_grid

LEVELS = {   # the reference's CIFAR-10 eps low/medium/high; step size and steps are the same at every level
    "low": {"eps": 20.0, "steps": 50, "step_size": 16.0},
    "medium": {"eps": 100.0, "steps": 50, "step_size": 16.0},
    "high": {"eps": 200.0, "steps": 50, "step_size": 16.0},
}
EPS_MEANING = "l_2 (per image) on the 8 whirlpool strengths (radians of peak rotation)"
NUM_WHIRLPOOLS = 8        # reference whirlpool.py
RADIUS = 0.5              # swirl radius (grid_sample units)
MIN_STRENGTH = 0.5        # s_min


def swirl_geometry(grid, centres, radius=RADIUS):
    """The strength-free part of the swirl, computed once per call: offsets d = p - c_k split into (dx, dy) and the
    radial decay exp(-|d| / rho), each (B, H, W, K)."""
    rho = math.log(2.0) * radius / 5.0
    d = grid.unsqueeze(3) - centres[:, None, None]                                 # (B, H, W, K, 2)
    r = d.norm(dim=-1)                                                             # (B, H, W, K)
    dx, dy = d.unbind(-1)
    return dx.contiguous(), dy.contiguous(), torch.exp(-r / rho)


def swirl_from_geometry(geometry, strengths, min_strength=MIN_STRENGTH):
    """Per-pixel displacement (B, H, W, 2) from swirl_geometry's output and the strengths (B, K) (|.| used)."""
    dx, dy, decay = geometry
    phi = (strengths.abs() + min_strength)[:, None, None, :] * decay
    cos_m1, sin = torch.cos(phi) - 1, torch.sin(phi)
    # R(phi) d - d, max over whirlpools per component (the same values as the max of the stacked pair)
    return torch.stack([(cos_m1 * dx - sin * dy).amax(dim=3), (sin * dx + cos_m1 * dy).amax(dim=3)], dim=-1)


def swirl_displacement(grid, centres, strengths, min_strength=MIN_STRENGTH, radius=RADIUS):
    """Per-pixel displacement (B, H, W, 2): elementwise max over whirlpools of the swirl displacements.

    grid (B, H, W, 2) identity grid, centres (B, K, 2), strengths (B, K) (|.| used), min_strength (B, 1) or float.
    """
    return swirl_from_geometry(swirl_geometry(grid, centres, radius), strengths, min_strength)


def whirlpool(model, x, y, *, eps=100.0, steps=50, step_size=16.0, direction=1, loss_fn=None, generator=None,
              num_whirlpools=NUM_WHIRLPOOLS, radius=RADIUS, min_strength=MIN_STRENGTH):
    """Whirlpool attack: swirl x around K random centres with strengths in an l2 ball of radius eps (3.14)."""
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if int(num_whirlpools) != num_whirlpools or num_whirlpools < 1:
        raise ValueError(f"num_whirlpools must be an integer >= 1, got {num_whirlpools!r}")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    b, _, h, w = x.shape
    k = int(num_whirlpools)
    eps_b = per_sample(eps, x).view(b, 1)                                          # (B, 1)
    kw = dict(generator=generator, device=x.device, dtype=x.dtype)
    centres = torch.rand((b, k, 2), **kw) * 2 - 1                                  # uniform in [-1, 1]^2
    grid = reference_grid(b, h, w, device=x.device, dtype=x.dtype)
    geometry = swirl_geometry(grid, centres, radius)                               # per call, not per step
    on = (eps_b > 0).view(b, 1, 1, 1)

    def render(strengths):
        delta = swirl_from_geometry(geometry, strengths, min_strength)
        out = F.grid_sample(x, grid + delta, mode="bilinear", padding_mode="zeros", align_corners=False)
        # DEVIATION: eps = 0 returns x (the reference swirls it by s_min) -- attack contract, README.md
        return torch.where(on, out, x)

    def project(strengths):
        return project_l2(strengths, eps_b)

    s0 = torch.rand((b, k), **kw)
    # DEVIATION: u drawn per image (reference: one scalar per batch) -- batch-independent attacks
    u = torch.rand((b, 1), **kw)
    s0 = eps_b * u * s0 / (s0.norm(dim=1, keepdim=True) + 1e-12)
    return latent_pgd(model, x, y, s0, render, project, steps=int(steps), step_size=step_size,
                      direction=direction, loss_fn=loss_fn, step_rule="l2")
