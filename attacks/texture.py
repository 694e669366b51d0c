"""Texture: the image becomes a "line drawing": edges are blackened and the texture between them washed to white.

Reference: Kaufmann et al., "Testing Robustness Against Unforeseen Adversaries" (arXiv 1908.08016), 2023 code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/texture.py
(CIFAR-10 defaults: eps from that repository's models/cifar10/cifar10_config.py, step size / steps from models.sh).

    structure  E = the reference's Canny-like thin-edge mask of the clean image (attacks/_edges.py, threshold 0.1,
               pixel for pixel the same), (B, 1, H, W), constant (no gradient through it)
    latent     w (B, 1, H, W), one whitening weight per pixel, shared over the channels
    render     x_k = x * (1 - g * E)              (edge pixels set to black; g = 1 if eps > 0 else 0)
               beta = |w| * (1 - E)
               x_adv = clamp(beta * 1 + (1 - beta) * x_k, 0, 1)
    constraint w in [-eps, eps], then [-1, 1] (clamps);  init U[0, eps];  step  w <- w + step_size * sign(grad)

Defaults (CIFAR-10 "medium", linf variant of the CIFAR config): eps 0.1, 30 steps, step size 0.003.
LEVELS holds low/medium/high. Reach 30 * 0.003 = 0.09 < eps at medium/high (reference property, partly offset by
the init). eps may be a float or a (B,) tensor.

Deviations from the reference:
  - The blackening of edge pixels is applied only to samples with eps > 0 (gate g) -- the project's rule that
    eps = 0 returns x; for every eps > 0 the render is the reference's.
  - Only the linf constraint of the CIFAR config is implemented (the reference's l2 option is not).

Depends on: attacks/_common.py, attacks/_edges.py
"""

import torch

from attacks._common import check_inputs, latent_pgd, per_sample, project_linf
from attacks._edges import CANNY_THRESHOLD, canny_edges

LEVELS = {   # the reference's CIFAR-10 eps low/medium/high; step size and steps are the same at every level
    "low": {"eps": 0.01, "steps": 30, "step_size": 0.003},
    "medium": {"eps": 0.1, "steps": 30, "step_size": 0.003},
    "high": {"eps": 0.2, "steps": 30, "step_size": 0.003},
}
EPS_MEANING = "l_inf on per-pixel whitening weights of the non-edge pixels (also clamped to [-1, 1])"


def texture(model, x, y, *, eps=0.1, steps=30, step_size=0.003, direction=1, loss_fn=None, generator=None,
            threshold=CANNY_THRESHOLD):
    """Texture attack: blacken the Canny edges, push the other pixels to white by |w| <= eps (reference texture.py)."""
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    b, _, h, w = x.shape
    eps_b = per_sample(eps, x)                                                    # (B, 1, 1, 1)
    mask = canny_edges(x, threshold)                                              # (B, 1, H, W), constant
    # DEVIATION: blackening gated on eps > 0 -- eps = 0 must return x (attack contract, README.md)
    x_black = x * (1 - (eps_b > 0).to(x.dtype) * mask)
    non_edge = 1 - mask

    def render(weights):
        beta = weights.abs() * non_edge
        return beta + (1 - beta) * x_black

    def project(weights):
        return project_linf(weights, eps_b).clamp(-1.0, 1.0)

    w0 = torch.rand((b, 1, h, w), generator=generator, device=x.device, dtype=x.dtype) * eps_b   # U[0, eps]
    return latent_pgd(model, x, y, w0, render, project, steps=int(steps), step_size=step_size,
                      direction=direction, loss_fn=loss_fn, step_rule="sign")
