"""Wood attack: bendable concentric dark rings (Kaufmann et al. 2023, "Testing Robustness Against Unforeseen
Adversaries", arXiv 1908.08016; reference code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/wood.py, whose CIFAR-10 levels take
eps from models/cifar10/cifar10_config.py and step size / steps from models.sh).

Latent:  a low-resolution offset field n (B, 1, r, r), r = noise_resolution (CIFAR 16), one channel per image.
Render:  u, v = 2(j - W/2)/W, 2(i - H/2)/H in [-1, 1)                (centred coordinates; image half-width = 1)
         d = sqrt(u^2 + v^2) + up(n)                                 (up = bilinear upsampling to H x W)
         m = |sin(pi * R * d)|^(1 / kappa)                           (R = num_rings 5, kappa = normalizing_constant 8)
         x_adv = clamp(x * m, 0, 1)                                  (one multiplicative mask for all channels)
         With kappa = 8, m is about 1 except on thin dark rings at the zeros of the sine; n bends and moves them.
Constraint: ||n||_inf <= eps per example (eps in units of d: 0.05 is about 0.8 px on 32 x 32).
Init:    n = 0 (the reference's wood_random_init=False), so the attack is deterministic.
Step:    n <- clamp(n + step_size * direction * sign(grad_n), -eps, eps)          (latent_pgd, step_rule "sign")

Defaults: the CIFAR-10 "medium" level of the reference: eps 0.05, steps 70, step_size 0.000625,
noise resolution 16, 5 rings, exponent 8. LEVELS holds low / medium / high (only eps changes between levels).
Kept reference property: 70 * 0.000625 = 0.044 < eps at medium and high, so those levels
cannot reach the boundary of the eps-ball from the zero init.

Deviations from the reference:
- eps = 0 returns x exactly (attack contract, README.md): the reference draws the undisturbed rings even with a
  zero offset field. Here an example with eps = 0 is returned unchanged; every example with eps > 0 gets the full
  rings, exactly as in the reference.
Numerical guard (not a change of the attack): |sin|^(1/kappa) is computed as
(sin^2 + 1e-20)^(1/(2 kappa)), whose derivative stays finite at sin = 0 (mask >= 0.056 instead of >= 0).

eps may be a float or a per-example (B,) tensor; direction +1 (maximise the loss) or -1, or a (B,) tensor.

Depends on: attacks/_common.py
"""

import math

import torch
import torch.nn.functional as F

from attacks._common import check_inputs, latent_pgd, per_sample

# CIFAR-10 levels of the reference (eps: models/cifar10/cifar10_config.py; step size / steps: models.sh)
LEVELS = {
    "low": {"eps": 0.03, "steps": 70, "step_size": 0.000625},
    "medium": {"eps": 0.05, "steps": 70, "step_size": 0.000625},
    "high": {"eps": 0.1, "steps": 70, "step_size": 0.000625},
}
EPS_MEANING = "l_inf on the ring-offset field (radius units, image half-width = 1)"
SIN_GUARD = 1e-20   # added to sin^2: finite derivative of the 1/kappa power at sin = 0 (mask floor 0.056)


def ring_radius(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """Distance of every pixel from the image centre in the reference's [-1, 1) coordinates, shape (H, W)."""
    v = 2 * (torch.arange(h, device=device, dtype=dtype) - h / 2) / h
    u = 2 * (torch.arange(w, device=device, dtype=dtype) - w / 2) / w
    return torch.sqrt(v[:, None] ** 2 + u[None, :] ** 2)


def render(x: torch.Tensor, noise: torch.Tensor, *, num_rings: int, normalizing_constant: float) -> torch.Tensor:
    """x * |sin(pi R (r + up(n)))|^(1/kappa), clamped to [0, 1]; noise (B, 1, r, r)."""
    h, w = x.shape[-2:]
    d = ring_radius(h, w, device=x.device, dtype=x.dtype) + F.interpolate(
        noise, size=(h, w), mode="bilinear", align_corners=False)            # (B, 1, H, W)
    s = torch.sin(math.pi * num_rings * d)
    mask = (s * s + SIN_GUARD) ** (0.5 / normalizing_constant)             # = |s|^(1/kappa), guarded
    return (x * mask).clamp(0.0, 1.0)


def wood(model, x, y, *, eps=0.05, steps=70, step_size=0.000625, num_rings=5, noise_resolution=16,
         normalizing_constant=8.0, direction=1, loss_fn=None, generator=None):
    """Wood attack: PGD (sign steps) on the l_inf-bounded ring-offset field; see the module docstring.

    generator is accepted for the common signature; wood draws nothing at random (zero init).
    """
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(step_size, torch.Tensor) and not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size!r}")
    if num_rings <= 0 or noise_resolution < 1 or normalizing_constant <= 0:
        raise ValueError(f"num_rings, noise_resolution and normalizing_constant must be positive, got "
                         f"{num_rings!r}, {noise_resolution!r}, {normalizing_constant!r}")
    eps_b = per_sample(eps, x)                                                 # (B, 1, 1, 1)
    r = int(noise_resolution)
    noise = torch.zeros(x.shape[0], 1, r, r, device=x.device, dtype=x.dtype)  # reference: zero init

    def project(n):
        return torch.maximum(torch.minimum(n, eps_b), -eps_b)

    def draw(n):
        return render(x, n, num_rings=num_rings, normalizing_constant=normalizing_constant)

    x_adv = latent_pgd(model, x, y, noise, draw, project, steps=int(steps), step_size=step_size,
                       direction=direction, loss_fn=loss_fn, step_rule="sign")
    # DEVIATION: eps = 0 returns x (the reference renders the rings at any eps) -- the attack contract (README.md)
    return torch.where(eps_b > 0, x_adv, x)
