"""Pixel attack: per-block pixelation of controllable strength (Kaufmann et al. 2023, "Testing Robustness Against
Unforeseen Adversaries", arXiv 1908.08016; reference code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/pixel.py, whose CIFAR-10 levels take
eps from models/cifar10/cifar10_config.py and step size / steps from models.sh).

Latent:  blend weights p (B, C, ceil(H/P), ceil(W/P)) in [0, 1], one per block and channel, P = pixel_size
         (CIFAR 4 -> 8 x 8 blocks of 4 x 4 px).
Render:  t = the TOP-LEFT pixel of each block (x[..., ::P, ::P]; as the reference, kept: not the block mean);
         every pixel of a block becomes (1 - p) x + p t, then clamp to [0, 1]. p = 1 on every block is full pixelation.
Constraint: ||p||_2 <= eps per example, then p clamped to [0, 1] (CIFAR: ||p||_2 <= sqrt(192) = 13.9 always).
Init:    p = |eps * u * w / ||w||_2| clamped to [0, 1], w ~ U[0, 1] per entry, u ~ U(0, 1).
Step:    p <- clamp01(P_{||.||_2 <= eps}(p + step_size * direction * g / ||g||_2))   (latent_pgd, step_rule "l2")

Defaults: the CIFAR-10 "medium" level of the reference: eps 5, steps 60, step_size 1.0, pixel size 4.
LEVELS holds low / medium / high (only eps changes between levels).

Deviations from the reference:
- The init scale u is drawn per example (the reference draws one Python random scalar for the whole batch), so
  an example's attack does not depend on which other examples share its batch.
- H or W not divisible by P: the last block row / column is cropped (the reference resizes bilinearly up to the
  next multiple of P, then crops).

eps may be a float or a per-example (B,) tensor; direction +1 (maximise the loss) or -1, or a (B,) tensor.

Depends on: attacks/_common.py
"""

import torch

from attacks._common import check_inputs, latent_pgd, per_sample, project_l2

# CIFAR-10 levels of the reference (eps: models/cifar10/cifar10_config.py; step size / steps: models.sh)
LEVELS = {
    "low": {"eps": 1.0, "steps": 60, "step_size": 1.0},
    "medium": {"eps": 5.0, "steps": 60, "step_size": 1.0},
    "high": {"eps": 10.0, "steps": 60, "step_size": 1.0},
}
EPS_MEANING = "l_2 (per image) on per-block pixelation weights, each in [0, 1]"


def upsample_blocks(t: torch.Tensor, size: int, h: int, w: int) -> torch.Tensor:
    """Repeat every block value over its size x size pixels and crop to (H, W)."""
    return t.repeat_interleave(size, dim=2).repeat_interleave(size, dim=3)[:, :, :h, :w]


def render(x: torch.Tensor, weights: torch.Tensor, *, pixel_size: int) -> torch.Tensor:
    """Blend every pixel towards its block's top-left pixel by the block's weight; weights (B, C, h/P, w/P)."""
    h, w = x.shape[-2:]
    # DEVIATION (sizes not divisible by P only): partial blocks are cropped (reference: resize, then crop)
    corner = x[:, :, ::pixel_size, ::pixel_size]                          # (B, C, ceil(H/P), ceil(W/P))
    p = upsample_blocks(weights, pixel_size, h, w)                        # (B, C, H, W)
    return ((1 - p) * x + p * upsample_blocks(corner, pixel_size, h, w)).clamp(0.0, 1.0)


def pixel(model, x, y, *, eps=5.0, steps=60, step_size=1.0, pixel_size=4, direction=1, loss_fn=None,
          generator=None):
    """Pixel attack: l_2-normalised PGD on l_2-bounded per-block pixelation weights; see the module docstring."""
    check_inputs(x, y, eps)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(step_size, torch.Tensor) and not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size!r}")
    if int(pixel_size) != pixel_size or pixel_size < 1:
        raise ValueError(f"pixel_size must be an integer >= 1, got {pixel_size!r}")
    b, c, h, w = x.shape
    size = int(pixel_size)
    eps_b = per_sample(eps, x)                                                      # (B, 1, 1, 1)
    shape = (b, c, -(-h // size), -(-w // size))                                    # ceil division
    raw = torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype)
    # DEVIATION: init scale u per example (reference: one scalar per batch) -- batch-independent attacks
    u = torch.rand((b, 1, 1, 1), generator=generator, device=x.device, dtype=x.dtype)
    norm = raw.flatten(1).norm(dim=1).view(b, 1, 1, 1)
    weights = (eps_b * u * raw / (norm + 1e-12)).abs().clamp(0.0, 1.0)

    def project(p):
        return project_l2(p, eps_b).clamp(0.0, 1.0)

    return latent_pgd(model, x, y, weights, lambda p: render(x, p, pixel_size=size), project, steps=int(steps),
                      step_size=step_size, direction=direction, loss_fn=loss_fn, step_rule="l2")
