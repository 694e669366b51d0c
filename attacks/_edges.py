"""A vectorised Canny-like edge detector (no hysteresis), shared by the `edge` and `texture` attacks.

The reference (attacks/edge.py of Kaufmann et al.'s 2023 code,
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/edge.py)
computes a thin edge mask of the CLEAN image:
  1. 3x3 Gaussian, sigma 1 on a [-1, 1] grid, normalised;
  2. 3x3 derivative kernels x / (x^2 + y^2): rows [-1/2, 0, 1/2], [-1, 0, 1], [-1/2, 0, 1/2] and the transpose,
     the two gradients averaged over the colour channels;
  3. gradient magnitude;  4. orientation quantised to 45 degrees;
  5. non-maximum suppression along the gradient direction;
  6. division by the per-image maximum;  7. threshold (0.1), no hysteresis.
The mask is a constant of the attack: it is computed under no_grad, nothing is differentiated through it.

Deviations from the reference:
  - Orientation from atan2 and an exact NMS against the two neighbours along the quantised gradient direction
    (the reference converts angles with 360/pi and its rotated diagonal kernels lose a tap, so diagonals are never
    suppressed). The edge density therefore differs from the reference's (README: measured).
  - Replicate padding at the image border, so the image frame itself is not an edge.
  - An absolute floor MIN_MAGNITUDE on the magnitude, so that a flat image (whose maximum is rounding noise) has no
    edges instead of edges everywhere.

Depends on: attacks/_common.py
"""

import math

import torch
import torch.nn.functional as F

from attacks._common import device_constant

CANNY_THRESHOLD = 0.1   # normalised magnitude threshold of the reference (step 7 above)
CANNY_SIGMA = 1.0       # 3x3 Gaussian, sigma 1 on the [-1, 1] grid (step 1)
# absolute floor on the gradient magnitude: above float32 rounding on a flat image (~1e-8), far below the weakest
# real 8-bit edge (a 1/255 step in one channel, averaged over 3 channels and smoothed: ~3e-4). Without it a flat
# image, normalised by its (rounding-noise) maximum, would be all edges.
MIN_MAGNITUDE = 1e-5

# neighbour offsets (dy, dx) along the gradient direction for the 4 orientation bins 0, 45, 90, 135 degrees;
# image rows grow downwards, so a gradient at +45 degrees (gx > 0, gy > 0 in row/col order) points down-right
_NMS_OFFSETS = ((0, 1), (1, 1), (1, 0), (1, -1))


def _kernels():
    """The 3x3 Gaussian (normalised) and the derivative kernels x / (x^2 + y^2) on the [-1, 1] grid (0 at the centre):
    rows [-1/2, 0, 1/2], [-1, 0, 1], [-1/2, 0, 1/2] and the transpose."""
    t = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    gauss = torch.exp(-(xx ** 2 + yy ** 2) / (2 * CANNY_SIGMA ** 2))
    r2 = (xx ** 2 + yy ** 2).clamp_min(1.0)
    return gauss / gauss.sum(), xx / r2, yy / r2


def canny_edges(x: torch.Tensor, threshold: float = CANNY_THRESHOLD) -> torch.Tensor:
    """Binary thin-edge mask (B, 1, H, W) of x (B, C, H, W) in [0, 1]; float 0/1, no gradient."""
    with torch.no_grad():
        x = x.detach()
        b, c, h, w = x.shape
        gauss, kx, ky = device_constant(("_edges.kernels", CANNY_SIGMA), _kernels, x.device, x.dtype)
        smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), gauss.expand(c, 1, 3, 3), groups=c)
        padded = F.pad(smooth, (1, 1, 1, 1), mode="replicate")
        gx = F.conv2d(padded, kx.expand(c, 1, 3, 3), groups=c).mean(1, keepdim=True)   # (B, 1, H, W)
        gy = F.conv2d(padded, ky.expand(c, 1, 3, 3), groups=c).mean(1, keepdim=True)
        mag = torch.sqrt(gx ** 2 + gy ** 2)

        # orientation modulo 180 degrees, quantised to the nearest of 0/45/90/135
        angle = torch.atan2(gy, gx)
        bins = torch.round(angle / (math.pi / 4)).long() % 4                              # (B, 1, H, W)

        # non-maximum suppression: keep a pixel if it is >= both neighbours along its gradient direction
        mp = F.pad(mag, (1, 1, 1, 1), mode="replicate")
        keep = torch.zeros_like(mag, dtype=torch.bool)
        for k, (dy, dx) in enumerate(_NMS_OFFSETS):   # 4 orientation bins, not a loop over images
            fwd = mp[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
            bwd = mp[:, :, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
            keep |= (bins == k) & (mag >= fwd) & (mag >= bwd)
        thin = mag * keep

        # normalise by the per-image maximum, then threshold (no hysteresis)
        peak = thin.flatten(1).amax(1).view(b, 1, 1, 1)
        return ((thin > threshold * peak) & (thin > MIN_MAGNITUDE)).to(x.dtype)
