"""Blur: an adversarial per-pixel blend between the image and a heavily blurred copy of it.

Reference: Kaufmann et al., "Testing Robustness Against Unforeseen Adversaries" (arXiv 1908.08016), 2023 code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/blur.py
(CIFAR-10 defaults: eps from that repository's models/cifar10/cifar10_config.py, step size / steps from models.sh).

    latent   m (B, 1, H, W), the blend weight of every pixel
    render   x_b = G_17,25 * x   (Gaussian blur, kernel 17, sigma 25: nearly a 17x17 box; reflect padding)
             m~  = G_9,18 * m    (kernel 9, sigma 18)
             x_adv = clamp(m~ * x_b + (1 - m~) * x, 0, 1)
    constraint  m in [0, eps] (clamp);  init U[0, eps];  step  m <- m + step_size * sign(grad)

Defaults (CIFAR-10 "medium"): eps 0.3, 20 steps, step size 0.015. LEVELS holds low/medium/high.
Reach = 20 * 0.015 = 0.3, so at "high" (0.6) many pixels cannot reach eps from the init (reference property).
eps = 0 gives m = 0, i.e. x exactly. eps may be a float or a (B,) tensor.

Deviations from the reference: none in the render or the constraint (blur with this package's separable Gaussian,
same kernel sizes, sigmas and reflect padding as torchvision's gaussian_blur).

Depends on: attacks/_common.py
"""

import torch

from attacks._common import check_inputs, gaussian_blur, latent_pgd, per_sample

LEVELS = {   # the reference's CIFAR-10 eps low/medium/high; step size and steps are the same at every level
    "low": {"eps": 0.1, "steps": 20, "step_size": 0.015},
    "medium": {"eps": 0.3, "steps": 20, "step_size": 0.015},
    "high": {"eps": 0.6, "steps": 20, "step_size": 0.015},
}
EPS_MEANING = "per-pixel blend weight toward a heavily blurred copy, in [0, eps]"
IMAGE_BLUR_SIGMA, IMAGE_BLUR_RADIUS = 25.0, 8     # kernel 17 (reference blur.py)
WEIGHT_BLUR_SIGMA, WEIGHT_BLUR_RADIUS = 18.0, 4   # kernel 9


def blur(model, x, y, *, eps=0.3, steps=20, step_size=0.015, direction=1, loss_fn=None, generator=None):
    """Blur attack: x_adv = m~ * blur(x) + (1 - m~) * x with a smoothed blend map m in [0, eps] (reference blur.py)."""
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    eps_b = per_sample(eps, x)                                                    # (B, 1, 1, 1)
    with torch.no_grad():
        x_blur = gaussian_blur(x, IMAGE_BLUR_SIGMA, IMAGE_BLUR_RADIUS)            # constant of the attack

    def render(m):
        m_smooth = gaussian_blur(m, WEIGHT_BLUR_SIGMA, WEIGHT_BLUR_RADIUS)        # (B, 1, H, W)
        return m_smooth * x_blur + (1 - m_smooth) * x

    def project(m):
        return torch.minimum(m.clamp_min(0.0), eps_b)

    b, _, h, w = x.shape
    m0 = torch.rand((b, 1, h, w), generator=generator, device=x.device, dtype=x.dtype) * eps_b   # U[0, eps]
    return latent_pgd(model, x, y, m0, render, project, steps=int(steps), step_size=step_size,
                      direction=direction, loss_fn=loss_fn, step_rule="sign")
