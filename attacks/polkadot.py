"""Polkadot: coloured dots are blended into the image with adversarial per-dot strengths.

Reference: Kaufmann et al., "Testing Robustness Against Unforeseen Adversaries" (arXiv 1908.08016), 2023 code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/polkadot.py
(CIFAR-10 defaults: eps from that repository's models/cifar10/cifar10_config.py, step size / steps from models.sh).

    structure  P = 20 dot centres uniform in [0, 1]^2, shared by the batch; one colour per (image, dot),
               uniform in [0, 1]^C. Pixel coordinates are (col, row) / W.
    latent     strengths a (B, P), a >= 0
    render     delta_p = max(1 - dist(pixel, centre_p), 0)^5             (distance normaliser 5)
               l_0 = 5 * 0.5 (image logit: distance scaling 5 x image threshold 0.5),  l_p = 5 * a_p * delta_p
               weights  w_0 = exp(l_0),  w_p = exp(l_p) - 1,  normalised to sum 1 per pixel
               x_adv = (w_0 x + sum_p w_p colour_p) / (w_0 + sum_p w_p)
    constraint l2 ball of radius eps per image on a, then |.|;  init U[0, 1]^P projected onto the ball;
               step  a <- |P_eps(a + step_size * grad / |grad|_2)|

Defaults (CIFAR-10 "medium"): eps 2, 40 steps, step size 0.3, 20 dots. LEVELS holds low/medium/high.
eps may be a float or a (B,) tensor.

Deviations from the reference:
  - Blend weights exp(l_p) - 1 for the dots instead of the reference's softmax weights exp(l_p). In the reference
    a zero-strength dot still has logit 0 and weight 1 against the image's e^2.5, so at a = 0 every pixel is
    blended ~62% toward the mean of the 20 random colours. Subtracting each dot's zero-strength weight makes a = 0
    (and so eps = 0) exactly the identity, while a strong dot (l_p >> 1) gets the reference's weight: the same dots,
    without the global colour wash. The attack is therefore weaker than the reference's at the same eps (no free
    ~60% wash).
  - delta_p is clamped at 0 for dist > 1 (the reference's (1 - dist)^5 goes negative in the far corners), so that no
    dot gets a negative weight.
  - The init U[0, 1]^P is projected onto the eps-ball before the first forward pass (the reference projects only
    after the first step, so its init is not bounded by eps).

Depends on: attacks/_common.py
"""

import torch

from attacks._common import check_inputs, latent_pgd, per_sample, project_l2

LEVELS = {   # the reference's CIFAR-10 eps low/medium/high; step size and steps are the same at every level
    "low": {"eps": 1.0, "steps": 40, "step_size": 0.3},
    "medium": {"eps": 2.0, "steps": 40, "step_size": 0.3},
    "high": {"eps": 3.0, "steps": 40, "step_size": 0.3},
}
EPS_MEANING = "l_2 (per image) on the 20 dot strengths (then |.|)"
NUM_DOTS = 20            # reference polkadot.py
DISTANCE_SCALING = 5.0
IMAGE_THRESHOLD = 0.5
DISTANCE_EXPONENT = 5    # polkadot_distance_normaliser


def dot_profiles(h: int, w: int, centres: torch.Tensor) -> torch.Tensor:
    """delta_p = max(1 - dist, 0)^5 for every dot and pixel (P, H, W); centres (P, 2) as (x, y) in [0, 1]."""
    rows = torch.arange(h, device=centres.device, dtype=centres.dtype) / w
    cols = torch.arange(w, device=centres.device, dtype=centres.dtype) / w
    dx = cols[None, None, :] - centres[:, 0, None, None]                          # (P, 1, W)
    dy = rows[None, :, None] - centres[:, 1, None, None]                          # (P, H, 1)
    dist = torch.sqrt(dx ** 2 + dy ** 2)                                          # (P, H, W)
    # DEVIATION: clamp at 0 for dist > 1 -- keeps every dot weight exp(l) - 1 >= 0
    return (1 - dist).clamp_min(0.0) ** DISTANCE_EXPONENT


def blend_dots(x, strengths, profiles, colours):
    """x_adv = (w_0 x + sum_p w_p colour_p) / sum(w), w_0 = e^{l_0}, w_p = e^{l_p} - 1 (module docstring)."""
    logits = DISTANCE_SCALING * strengths[:, :, None, None] * profiles[None]      # (B, P, H, W), >= 0
    image_logit = DISTANCE_SCALING * IMAGE_THRESHOLD
    # shift by the per-pixel max logit for stability (the ratio of weights does not depend on it)
    top = logits.amax(1, keepdim=True).clamp_min(image_logit).detach()            # (B, 1, H, W)
    w_image = torch.exp(image_logit - top)
    # DEVIATION: exp(l_p) - 1 instead of exp(l_p) -- zero strength must be the identity (no global colour wash)
    w_dots = torch.exp(logits - top) - torch.exp(-top)                            # (B, P, H, W)
    mixed = w_image * x + torch.einsum("bphw,bpc->bchw", w_dots, colours)
    return mixed / (w_image + w_dots.sum(1, keepdim=True))


def polkadot(model, x, y, *, eps=2.0, steps=40, step_size=0.3, direction=1, loss_fn=None, generator=None,
             num_dots=NUM_DOTS):
    """Polkadot attack: blend P random coloured dots into x with strengths in an l2 ball of radius eps (3.15)."""
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if int(num_dots) != num_dots or num_dots < 1:
        raise ValueError(f"num_dots must be an integer >= 1, got {num_dots!r}")
    b, c, h, w = x.shape
    p = int(num_dots)
    eps_b = per_sample(eps, x).view(b, 1)                                          # (B, 1)
    kw = dict(generator=generator, device=x.device, dtype=x.dtype)
    centres = torch.rand((p, 2), **kw)                                             # shared by the batch
    colours = torch.rand((b, p, c), **kw)
    profiles = dot_profiles(h, w, centres)

    def render(strengths):
        return blend_dots(x, strengths, profiles, colours)

    def project(strengths):
        return project_l2(strengths, eps_b).abs()

    # DEVIATION: latent_pgd projects the U[0, 1] init onto the eps-ball before the first forward (reference: after)
    a0 = torch.rand((b, p), **kw)
    return latent_pgd(model, x, y, a0, render, project, steps=int(steps), step_size=step_size,
                      direction=direction, loss_fn=loss_fn, step_rule="l2")
