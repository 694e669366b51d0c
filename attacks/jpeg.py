"""JPEG attack: perturb the 8 x 8 block-DCT coefficients of the YCbCr image, giving blocky JPEG-like artefacts
(Kaufmann et al. 2023, "Testing Robustness Against Unforeseen Adversaries", arXiv 1908.08016; reference code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/jpeg.py, whose CIFAR-10 levels take
eps from models/cifar10/cifar10_config.py and step size / steps from models.sh).

Latent:  q (B, 3, H/8, W/8, 8, 8): additive offsets to the block-DCT coefficients of Y, Cb and Cr (no chroma
         subsampling), in units of 1/255 of the coefficient scale (eps = 3/255 = 3 grey levels per coefficient).
Render:  z = YCbCr(255 x) (JPEG full-range matrix, +128 on Cb and Cr); split into 8 x 8 blocks, subtract 128;
         c = D z D^T (orthonormal DCT-II); c <- c + 255 q; z = D^T c D + 128; x_adv = clamp(RGB(z) / 255, 0, 1).
         There is NO quantisation in the 2023 reference (kept): the map is affine up to the clamp.
         The DCT is an 8 x 8 matrix applied on both sides (the reference uses an FFT-based DCT; same transform).
Constraint: ||q||_inf <= eps per example.
Init:    q ~ U[0, eps] (one-sided, as the reference).
Step:    q <- clamp(q + step_size * direction * sign(grad_q), -eps, eps)          (latent_pgd, step_rule "sign")

Defaults: the CIFAR-10 "medium" level of the reference: eps 3/255, steps 50, step_size 0.0024.
LEVELS holds low / medium / high (only eps changes between levels).

Deviations from the reference:
- H or W not a multiple of 8 (the reference requires multiples of 8): the image is edge-padded to the next
  multiple of 8 before the block DCT and the result is cropped back.
- YCbCr -> RGB uses the exact inverse of the forward matrix (computed in float64) rather than the rounded JPEG
  constants, so the round trip at q = 0 is exact to float32 rounding (eps = 0 returns x).

eps may be a float or a per-example (B,) tensor; direction +1 (maximise the loss) or -1, or a (B,) tensor.

Depends on: attacks/_common.py
"""

import math

import torch
import torch.nn.functional as F

from attacks._common import check_inputs, device_constant, latent_pgd, per_sample

# CIFAR-10 levels of the reference (eps: models/cifar10/cifar10_config.py; step size / steps: models.sh)
LEVELS = {
    "low": {"eps": 1 / 255, "steps": 50, "step_size": 0.0024},
    "medium": {"eps": 3 / 255, "steps": 50, "step_size": 0.0024},
    "high": {"eps": 6 / 255, "steps": 50, "step_size": 0.0024},
}
EPS_MEANING = "l_inf on 8x8 block-DCT coefficients of YCbCr (units of 255 grey levels)"
BLOCK = 8
# JPEG (JFIF) full-range RGB -> YCbCr matrix; Cb and Cr are offset by +128 (on the 0..255 scale)
RGB_TO_YCBCR = ((0.299, 0.587, 0.114),
                (-0.168736, -0.331264, 0.5),
                (0.5, -0.418688, -0.081312))
CHROMA_OFFSET = (0.0, 128.0, 128.0)
LEVEL_SHIFT = 128.0   # JPEG centres the samples before the DCT


def dct_matrix(n: int = BLOCK, device=None, dtype=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n): coefficients = D @ block @ D.T, block = D.T @ coefficients @ D."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def colour_matrices(device=None, dtype=None):
    """The RGB -> YCbCr matrix, its exact inverse and the chroma offset, as (3, 3), (3, 3), (1, 3, 1, 1)."""
    # DEVIATION: exact inverse instead of the rounded JPEG constants -- the round trip at q = 0 is exact
    m = torch.tensor(RGB_TO_YCBCR, dtype=torch.float64)
    kw = {"device": device, "dtype": dtype}
    return m.to(**kw), torch.linalg.inv(m).to(**kw), torch.tensor(CHROMA_OFFSET, **kw).view(1, 3, 1, 1)


def _constants(device, dtype):
    """(m, m_inv, offset, D) on the device, built once per (device, dtype): the render runs every step, and building
    them there meant a float64 matrix inverse on the CPU and four blocking host -> device copies per step."""
    return device_constant("jpeg.constants", lambda: (*colour_matrices(dtype=dtype), dct_matrix(dtype=dtype)),
                           device, dtype)


def to_blocks(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H/8, W/8, 8, 8)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // BLOCK, BLOCK, w // BLOCK, BLOCK).transpose(3, 4)


def from_blocks(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H/8, W/8, 8, 8) -> (B, C, H, W)."""
    b, c, nh, nw = z.shape[:4]
    return z.transpose(3, 4).reshape(b, c, nh * BLOCK, nw * BLOCK)


def render(x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """RGB -> YCbCr -> block DCT, add 255 * coeffs, inverse; coeffs (B, 3, ceil(H/8), ceil(W/8), 8, 8)."""
    h, w = x.shape[-2:]
    ph, pw = -h % BLOCK, -w % BLOCK
    # DEVIATION: edge-pad to a multiple of 8 (the reference requires multiples of 8) -- any H, W >= 16 works
    xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
    m, m_inv, offset, d = _constants(x.device, x.dtype)
    ycc = torch.einsum("ij,bjhw->bihw", m, 255 * xp) + offset                       # (B, 3, H', W') on 0..255
    c = d @ to_blocks(ycc - LEVEL_SHIFT) @ d.T                                      # (B, 3, H'/8, W'/8, 8, 8)
    c = c + 255 * coeffs
    ycc = from_blocks(d.T @ c @ d) + LEVEL_SHIFT
    rgb = torch.einsum("ij,bjhw->bihw", m_inv, ycc - offset) / 255
    return rgb[:, :, :h, :w].clamp(0.0, 1.0)


def jpeg(model, x, y, *, eps=3 / 255, steps=50, step_size=0.0024, direction=1, loss_fn=None, generator=None):
    """JPEG attack: sign-step PGD on l_inf-bounded YCbCr block-DCT offsets; see the module docstring."""
    check_inputs(x, y, eps)
    if x.shape[1] != 3:
        raise ValueError(f"jpeg needs RGB images (C = 3), got C = {x.shape[1]}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(step_size, torch.Tensor) and not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size!r}")
    b, _, h, w = x.shape
    eps_b = per_sample(eps, x).view(b, 1, 1, 1, 1, 1)                                # (B, 1, 1, 1, 1, 1)
    shape = (b, 3, -(-h // BLOCK), -(-w // BLOCK), BLOCK, BLOCK)
    coeffs = eps_b * torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype)   # U[0, eps]

    def project(q):
        return torch.maximum(torch.minimum(q, eps_b), -eps_b)

    return latent_pgd(model, x, y, coeffs, lambda q: render(x, q), project, steps=int(steps), step_size=step_size,
                      direction=direction, loss_fn=loss_fn, step_rule="sign")
