"""Gabor attack: sparse impulses convolved with a Gabor kernel give a striped, plaid-like noise (Kaufmann et al.
2023, "Testing Robustness Against Unforeseen Adversaries", arXiv 1908.08016; reference code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/gabor.py, whose CIFAR-10 levels take
eps from models/cifar10/cifar10_config.py and step size / steps from models.sh).

Fixed random structure (drawn once per call): a sparse mask (B, C, H, W), Bernoulli(density) per entry
         (density 0.1; the reference draws the same distribution with scipy.sparse.random on the CPU).
Kernel:  on a k x k grid with coordinates in [-0.5, 0.5] (k = kernel_size 23),
         K(theta) = exp(-(u^2 + v^2) / (2 (sigma + 0.001)^2)) * cos(2 pi gamma u'),   u' = u cos(theta) + v sin(theta)
         G = K(theta) + sum_{i=1..S-1} K(theta + i pi / S) / S                         (S = sides 3, sigma 3)
         theta ~ U(0, pi), gamma ~ U(3, k/4): one pair for the whole batch.
         As the reference, the kernel is re-drawn for every forward pass: at every PGD step and again for the
         returned image (redraw_kernel=True, the default; the reference's comment: it decorrelates Gabor from the
         other attacks). redraw_kernel=False draws one kernel per call -- a different, much stronger attack.
Latent:  sparse values g (B, C, H, W); only masked entries are ever non-zero.
Render:  noise_c = conv2d(g_c * mask_c, G) with "same" padding, the same kernel for every image and channel
         (all B * C maps at once, via FFTs; the reference loops over channels); NO normalisation;
         x_adv = x + clamp(noise, -x, 1 - x) = clamp(x + noise, 0, 1).
Constraint: ||g||_inf <= eps per example.
Init:    every masked entry = eps * u, u ~ U(0, 1).
Step:    g <- clamp(g + step_size * direction * sign(grad_g), -eps, eps)         (latent_pgd, step_rule "sign")

Defaults: the CIFAR-10 "medium" level of the reference: eps 0.03, steps 80, step_size 0.0025, kernel 23,
3 sides, sigma 3, density 0.1. LEVELS holds low / medium / high (only eps changes between levels).
About 53 masked entries fall under one 23 x 23 window, so the noise can reach O(1): Gabor is very visible on CIFAR.

Side by side with the reference code (tests/upstream_semantic_check.py, README "Semantic attacks against the
original code"): with the per-step re-draw our gabor matches it within seed noise; one kernel per call takes a
width-8 PGD model from the original's 31.8% to 4.2% -- it changes the calibrated budgets (CAS Eq. 11), so it is not
the default.

Deviations from the reference:
- The init scale u is drawn per example (the reference draws one scalar for the whole batch), so an example's
  attack does not depend on which other examples share its batch.
- The mask is an i.i.d. Bernoulli(density) draw per entry (scipy.sparse.random fixes the number of non-zeros to
  round(density * n); same expected density).

eps may be a float or a per-example (B,) tensor; direction +1 (maximise the loss) or -1, or a (B,) tensor.
generator (if given) must live on x's device.

Depends on: attacks/_common.py
"""

import math

import torch

from attacks._common import check_inputs, latent_pgd, per_sample

# CIFAR-10 levels of the reference (eps: models/cifar10/cifar10_config.py; step size / steps: models.sh)
LEVELS = {
    "low": {"eps": 0.02, "steps": 80, "step_size": 0.0025},
    "medium": {"eps": 0.03, "steps": 80, "step_size": 0.0025},
    "high": {"eps": 0.04, "steps": 80, "step_size": 0.0025},
}
EPS_MEANING = "l_inf on the sparse impulse values convolved with the Gabor kernel"
SIGMA_GUARD = 0.001     # the reference adds 0.001 to sigma in the envelope
GAMMA_MIN = 3.0         # gamma ~ U(3, kernel_size / 4) cycles per kernel width


def gabor_kernel(size: int, sides: int, sigma: float, theta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Multi-sided Gabor kernel (size, size); theta, gamma: scalar tensors (dtype and device of the kernel)."""
    t = torch.linspace(-0.5, 0.5, size, device=theta.device, dtype=theta.dtype)
    v, u = torch.meshgrid(t, t, indexing="ij")                                       # (k, k)
    angles = theta + torch.arange(sides, device=t.device, dtype=t.dtype) * math.pi / sides
    weights = torch.full((sides,), 1.0 / sides, device=t.device, dtype=t.dtype)
    weights[0] = 1.0                                                                 # K(theta) + sum K(...) / S
    rotated = u * torch.cos(angles).view(-1, 1, 1) + v * torch.sin(angles).view(-1, 1, 1)   # (S, k, k)
    envelope = torch.exp(-(u ** 2 + v ** 2) / (2 * (sigma + SIGMA_GUARD) ** 2))
    return (weights.view(-1, 1, 1) * envelope * torch.cos(2 * math.pi * gamma * rotated)).sum(0)


def draw_kernel(size: int, sides: int, sigma: float, *, device, dtype, generator=None) -> torch.Tensor:
    """A random kernel: theta ~ U(0, pi), gamma ~ U(3, size / 4), one pair for the whole batch."""
    theta, gamma = torch.rand(2, device=device, dtype=dtype, generator=generator)
    return gabor_kernel(size, sides, sigma, math.pi * theta, GAMMA_MIN + (size / 4 - GAMMA_MIN) * gamma)


def same_conv(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """F.conv2d(maps, kernel, padding=k // 2) for every (H, W) map in maps (..., H, W), computed with FFTs.

    A 23 x 23 kernel on 32 x 32 maps is ~10x faster as a zero-padded FFT product than as a direct convolution
    on the CPU; the result is the same linear map (conv2d is a cross-correlation, hence the flipped kernel).
    """
    h, w = maps.shape[-2:]
    k = kernel.shape[-1]
    size = (h + k - 1, w + k - 1)                                      # full linear convolution, no wrap-around
    spectrum = torch.fft.rfft2(maps, s=size) * torch.fft.rfft2(kernel.flip(0, 1), s=size)
    return torch.fft.irfft2(spectrum, s=size)[..., k // 2:k // 2 + h, k // 2:k // 2 + w]


def render(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """clamp(x + conv2d(values * mask, kernel), 0, 1): the same kernel on every map, 'same' zero padding."""
    return (x + same_conv(values * mask, kernel)).clamp(0.0, 1.0)


def gabor(model, x, y, *, eps=0.03, steps=80, step_size=0.0025, kernel_size=23, sides=3, sigma=3.0, density=0.1,
          redraw_kernel=True, direction=1, loss_fn=None, generator=None):
    """Gabor attack: sign-step PGD on l_inf-bounded sparse impulses under a Gabor kernel; see the module docstring."""
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(step_size, torch.Tensor) and not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size!r}")
    if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    if int(sides) != sides or sides < 1 or sigma <= 0 or not 0 < density <= 1:
        raise ValueError(f"need integer sides >= 1, sigma > 0 and density in (0, 1], got {sides!r}, {sigma!r}, "
                         f"{density!r}")
    b, c, h, w = x.shape
    kw = {"device": x.device, "dtype": x.dtype, "generator": generator}
    eps_b = per_sample(eps, x)                                                          # (B, 1, 1, 1)
    mask = (torch.rand(b, c, h, w, **kw) < density).to(x.dtype)                        # sparse structure
    # DEVIATION: init scale u per example (reference: one scalar per batch) -- batch-independent attacks
    values = eps_b * torch.rand(b, 1, 1, 1, **kw) * mask

    def new_kernel():
        return draw_kernel(int(kernel_size), int(sides), sigma, **kw)

    fixed = None if redraw_kernel else new_kernel()   # redraw_kernel=False: one kernel for the whole call (opt-in)

    def draw(g):   # redraw_kernel=True (reference): a fresh kernel for every forward pass, including the output
        return render(x, g, mask, new_kernel() if fixed is None else fixed)

    def project(g):
        return torch.maximum(torch.minimum(g, eps_b), -eps_b)

    return latent_pgd(model, x, y, values, draw, project, steps=int(steps), step_size=step_size,
                      direction=direction, loss_fn=loss_fn, step_rule="sign")
