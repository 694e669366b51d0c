"""The edge detector of the `edge` and `texture` attacks: the original's Canny-like filter (no hysteresis), vectorised.

The reference (CannyFilter in attacks/edge.py of Kaufmann et al.'s 2023 code,
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/edge.py)
computes a thin edge mask of the CLEAN image; every step below is the reference's, zero padding included:
  1. 3x3 Gaussian (sigma 1 on a [-1, 1] grid, normalised) per colour channel;
  2. 3x3 derivative kernels x / (x^2 + y^2): rows [-1/2, 0, 1/2], [-1, 0, 1], [-1/2, 0, 1/2] and the transpose,
     the two gradients summed over the colour channels and divided by their number;
  3. magnitude sqrt(gx^2 + gy^2);
  4. orientation atan(gy / gx) * 360 / pi + 180 degrees, rounded to a multiple of 45: a bin k in 0..7 (the factor
     360 / pi, not 180 / pi, doubles the angle, so the bins are not the gradient's direction: the reference's, kept);
  5. non-maximum suppression with the reference's 8 directional kernels (centre 1, one neighbour -1): a pixel in
     bin k or k + 4 (k = 0..3) is kept only if its magnitude is strictly above its neighbours under kernels k and
     k + 4. The reference builds the kernels by rotating a 5x5 kernel with bilinear interpolation and keeping the
     entries that stay exactly +-1; at 270 and 315 degrees the neighbour's entry does not, so those two kernels
     compare with nothing (magnitude > 0 suffices): _NEIGHBOURS below lists the 8 as they come out;
  6. division by the per-image maximum;  7. threshold (> 0.1), no hysteresis.
All convolutions pad with zeros (the reference's Conv2d padding), so the image frame itself is usually an edge.
The mask is a constant of the attack: it is computed under no_grad, nothing is differentiated through it.
No deviations (a vectorised rewrite: the reference loops over the colour channels and the 4 orientation pairs).

Depends on: attacks/_common.py
"""

import math

import torch
import torch.nn.functional as F

from attacks._common import device_constant

CANNY_THRESHOLD = 0.1   # normalised magnitude threshold of the reference (step 7 above)
CANNY_SIGMA = 1.0       # 3x3 Gaussian, sigma 1 on the [-1, 1] grid (step 1)
# the neighbour (dy, dx) of the reference's directional kernel for bins 0..7 (0, 45, ..., 315 degrees), None where
# the reference's rotated kernel lost it (step 5)
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), None, None)


def _kernels():
    """The 3x3 Gaussian (normalised), the derivative kernels x / (x^2 + y^2) on the [-1, 1] grid (0 at the centre):
    rows [-1/2, 0, 1/2], [-1, 0, 1], [-1/2, 0, 1/2] and the transpose, and the 8 directional kernels (8, 1, 3, 3)."""
    t = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    gauss = torch.exp(-(xx ** 2 + yy ** 2) / (2 * CANNY_SIGMA ** 2))
    r2 = (xx ** 2 + yy ** 2).clamp_min(1.0)
    directional = torch.zeros(8, 1, 3, 3, dtype=torch.float64)
    directional[:, 0, 1, 1] = 1.0
    for k, nb in enumerate(_NEIGHBOURS):
        if nb is not None:
            directional[k, 0, 1 + nb[0], 1 + nb[1]] = -1.0
    return gauss / gauss.sum(), xx / r2, yy / r2, directional


def canny_edges(x: torch.Tensor, threshold: float = CANNY_THRESHOLD) -> torch.Tensor:
    """Binary thin-edge mask (B, 1, H, W) of x (B, C, H, W) in [0, 1]; float 0/1, no gradient."""
    with torch.no_grad():
        x = x.detach()
        b, c, h, w = x.shape
        gauss, kx, ky, directional = device_constant(("_edges.kernels", CANNY_SIGMA), _kernels, x.device, x.dtype)
        smooth = F.conv2d(x, gauss.expand(c, 1, 3, 3), padding=1, groups=c)
        gx = F.conv2d(smooth, kx.expand(c, 1, 3, 3), padding=1, groups=c).sum(1, keepdim=True) / c   # (B, 1, H, W)
        gy = F.conv2d(smooth, ky.expand(c, 1, 3, 3), padding=1, groups=c).sum(1, keepdim=True) / c
        mag = (gx ** 2 + gy ** 2) ** 0.5

        angle = torch.atan(gy / gx) * (360 / math.pi) + 180                   # NaN where gx = gy = 0: no bin
        bins = torch.round(angle / 45) % 8                                      # float 0..7 (or NaN)
        diff = F.conv2d(mag, directional, padding=1)                            # (B, 8, H, W): mag - neighbour
        is_max = torch.minimum(diff[:, :4], diff[:, 4:]) > 0                    # (B, 4, H, W): pairs k, k + 4
        pair = torch.arange(4, device=x.device, dtype=x.dtype).view(1, 4, 1, 1)
        oriented = (bins == pair) | (bins == pair + 4)                          # (B, 4, H, W), one-hot or none
        thin = torch.where((oriented & ~is_max).any(1, keepdim=True), torch.zeros_like(mag), mag)

        peak = thin.flatten(1).amax(1).view(b, 1, 1, 1)
        return (thin / peak > threshold).to(x.dtype)                            # peak 0 (black image): no edges
