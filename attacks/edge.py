"""Edge: the edge pixels of the image are greyed out and then adversarially recoloured.

Reference: Kaufmann et al., "Testing Robustness Against Unforeseen Adversaries" (arXiv 1908.08016), 2023 code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/edge.py
(CIFAR-10 defaults: eps from that repository's models/cifar10/cifar10_config.py, step size / steps from models.sh).

    structure  E = the reference's Canny-like thin-edge mask of the clean image (attacks/_edges.py, threshold 0.1,
               pixel for pixel the same), (B, 1, H, W), constant (no gradient through it)
    latent     e (B, C, H, W), used on edge pixels only
    render     x_adv = clamp(x + g * E * (0.5 - x) + E * e, 0, 1),  g = 1 if eps > 0 else 0
               (for eps > 0: edge pixels become grey 0.5 + e, the reference render)
    constraint e in [-eps, eps] (clamp);  init U[0, eps] on edge pixels;  step  e <- e + step_size * sign(grad)

Defaults (CIFAR-10 "medium"): eps 0.1, 60 steps, step size 0.02. LEVELS holds low/medium/high.
eps may be a float or a (B,) tensor.

Deviations from the reference:
  - Init U[0, eps] instead of U[0, 1] (the reference init is not scaled by eps, so its first forward pass sees
    edge values up to 1.5) -- the project's rule that eps bounds the attack and eps = 0 is x.
  - The greying of edge pixels is applied only to samples with eps > 0 (gate g) -- the project's rule eps = 0 -> x;
    for every eps > 0 the render is the reference's.
  - A final clamp to [0, 1] (the reference has none; at eps <= 0.3 its values stay in [0.2, 0.8] anyway).

Depends on: attacks/_common.py, attacks/_edges.py
"""

import torch

from attacks._common import check_inputs, latent_pgd, per_sample, project_linf
from attacks._edges import CANNY_THRESHOLD, canny_edges

LEVELS = {   # the reference's CIFAR-10 eps low/medium/high; step size and steps are the same at every level
    "low": {"eps": 0.03, "steps": 60, "step_size": 0.02},
    "medium": {"eps": 0.1, "steps": 60, "step_size": 0.02},
    "high": {"eps": 0.3, "steps": 60, "step_size": 0.02},
}
EPS_MEANING = "l_inf on the colour offsets of the (greyed) edge pixels around grey 0.5"
GREY = 0.5   # edge pixels are replaced by mid-grey (reference edge.py)


def edge(model, x, y, *, eps=0.1, steps=60, step_size=0.02, direction=1, loss_fn=None, generator=None,
         threshold=CANNY_THRESHOLD):
    """Edge attack: grey out the Canny edges of x and recolour them by e in [-eps, eps] (reference edge.py)."""
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    eps_b = per_sample(eps, x)                                                    # (B, 1, 1, 1)
    mask = canny_edges(x, threshold)                                              # (B, 1, H, W), constant
    # DEVIATION: greying gated on eps > 0 -- eps = 0 must return x (attack contract, README.md)
    x_grey = x + (eps_b > 0).to(x.dtype) * mask * (GREY - x)

    def render(e):
        return x_grey + mask * e

    def project(e):
        return project_linf(e, eps_b) * mask

    # DEVIATION: init U[0, eps] (reference: U[0, 1], not scaled by eps) -- eps bounds the attack
    e0 = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * eps_b
    return latent_pgd(model, x, y, e0, render, project, steps=int(steps), step_size=step_size,
                      direction=direction, loss_fn=loss_fn, step_rule="sign")
