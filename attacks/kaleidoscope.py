"""Kaleidoscope attack: bright translucent coloured shapes with dark outlines (Kaufmann et al. 2023, "Testing
Robustness Against Unforeseen Adversaries", arXiv 1908.08016; reference code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/kaleidoscope.py, whose CIFAR-10
levels take eps from models/cifar10/cifar10_config.py and step size / steps from models.sh).

Fixed random structure per image (drawn once per call, for the whole batch at once):
  N shapes (CIFAR 5), each uniformly a circle (radius size/2), an equilateral triangle (edge
  floor(1.5 size / sin 60deg) = 6 px on CIFAR) or a square (edge size = 4 px), at a uniform random centre and
  (triangle, square) a uniform random rotation; base colours from HSV with hue U(0, 1), saturation U(0.7, 1),
  value U(0.8, 1). Edge ring of a shape = its dilation by an edge_width x edge_width box (max pooling) minus the
  shape; the edge mask is the union of all rings.
Latent:  colour offsets c (B, N, 3) (one RGB offset per shape) and edge brightness e (B, 1, H, W), packed into one
         (B, 3N + HW) tensor so that one PGD loop updates both with the same sign step.
Render:  inside the union of shapes: x_adv = t x + sum over covering shapes of (base colour + c)   (t = 0.2;
         overlaps add up); then every edge-ring pixel is set to |e| (grey, the same on R, G, B); clamp to [0, 1].
Constraint: ||c||_inf <= eps and ||e||_inf <= eps per example (outlines are near-black, brightness <= eps).
Init:    c ~ U[-eps, eps], e ~ U[0, eps].
Step:    (c, e) <- clamp((c, e) + step_size * direction * sign(grad), -eps, eps)    (latent_pgd, "sign")

Defaults: the CIFAR-10 "medium" level of the reference: eps 0.1, steps 30, step_size 0.005, 5 shapes,
size 4, transparency 0.2, min value 0.8, min saturation 0.7, edge width 5. LEVELS holds low / medium / high.

Deviations from the reference:
- eps = 0 returns x exactly (attack contract, README.md): the reference paints the shapes at any eps.
  Here an example with eps = 0 is returned unchanged; examples with eps > 0 get the shapes as in the reference.
- Shapes are rasterised analytically on the pixel grid (circle: distance test; triangle / square: three / four
  half-plane tests in the rotated frame), all images and shapes at once; edge rings by max-pool dilation, edge
  zeroing by torch.where. The reference fills shapes with a Python scan-line loop whose triangle / square
  routines swap row and column and can fill whole rows; that only changes what the random shapes look like, so
  any reasonable rasteriser is a faithful-enough substitute. Pixel (i, j) has coordinates (row i, column j);
  centres are uniform in [0, H) x [0, W).

eps may be a float or a per-example (B,) tensor; direction +1 (maximise the loss) or -1, or a (B,) tensor.
generator (if given) must live on x's device.

Depends on: attacks/_common.py
"""

import math

import torch
import torch.nn.functional as F

from attacks._common import check_inputs, device_constant, latent_pgd, per_sample

# CIFAR-10 levels of the reference (eps: models/cifar10/cifar10_config.py; step size / steps: models.sh)
LEVELS = {
    "low": {"eps": 0.05, "steps": 30, "step_size": 0.005},
    "medium": {"eps": 0.1, "steps": 30, "step_size": 0.005},
    "high": {"eps": 0.15, "steps": 30, "step_size": 0.005},
}
EPS_MEANING = "l_inf on per-shape colour offsets and on outline brightness"
TRIANGLE_SCALE = 1.5 / math.sin(math.pi / 3)   # triangle edge = floor(1.5 * size / sin 60deg) (reference)
CIRCLE, TRIANGLE, SQUARE = 0, 1, 2


def shape_masks(b: int, n: int, h: int, w: int, size: float, *, device, dtype, generator=None) -> torch.Tensor:
    """Random circles / triangles / squares rasterised as float masks (B, N, H, W), all at once."""
    kw = {"device": device, "generator": generator}
    kind = torch.randint(0, 3, (b, n, 1, 1), **kw)
    centre = torch.rand(b, n, 2, **kw).to(dtype) * device_constant(
        ("kaleidoscope.size", h, w), lambda: torch.tensor([h, w]), device, dtype)
    angle = 2 * math.pi * torch.rand(b, n, 1, 1, **kw).to(dtype)
    dy = torch.arange(h, device=device, dtype=dtype).view(1, 1, h, 1) - centre[..., 0, None, None]   # (B, N, H, 1)
    dx = torch.arange(w, device=device, dtype=dtype).view(1, 1, 1, w) - centre[..., 1, None, None]   # (B, N, 1, W)
    u = dx * torch.cos(angle) + dy * torch.sin(angle)                                  # (B, N, H, W) rotated frame
    v = -dx * torch.sin(angle) + dy * torch.cos(angle)
    # DEVIATION: analytic distance / half-plane tests (reference: Python scan-line fill) -- vectorised
    circle = dx ** 2 + dy ** 2 <= (size / 2) ** 2
    square = torch.maximum(u.abs(), v.abs()) <= size / 2
    edge = math.floor(TRIANGLE_SCALE * size)
    inradius = edge / (2 * math.sqrt(3))           # equilateral triangle: inside <=> n_k . p <= inradius, k = 0..2
    normals = [(math.cos(a), math.sin(a)) for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3,
                                                     math.pi / 2 + 4 * math.pi / 3)]
    triangle = torch.stack([u * cu + v * cv <= inradius for cu, cv in normals]).all(0)
    masks = torch.where(kind == CIRCLE, circle, torch.where(kind == TRIANGLE, triangle, square))
    return masks.to(dtype)


def edge_rings(masks: torch.Tensor, edge_width: int) -> torch.Tensor:
    """Union over shapes of (dilation by an edge_width box) minus the shape: (B, N, H, W) -> (B, 1, H, W)."""
    b, n, h, w = masks.shape
    lo, hi = (edge_width - 1) // 2, edge_width // 2
    padded = F.pad(masks.reshape(b * n, 1, h, w), (lo, hi, lo, hi))        # zero padding: masks are >= 0
    dilated = F.max_pool2d(padded, edge_width, stride=1).view(b, n, h, w)
    return (dilated - masks).amax(1, keepdim=True)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(..., 3) HSV in [0, 1] -> (..., 3) RGB: channel = v - v s clamp(min(k, 4 - k), 0, 1), k = (m + 6 h) mod 6."""
    h, s, v = hsv.unbind(-1)
    m = device_constant("kaleidoscope.hsv_m", lambda: torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64),
                        hsv.device, hsv.dtype)
    k = (m + 6 * h[..., None]) % 6
    return v[..., None] - v[..., None] * s[..., None] * torch.minimum(k, 4 - k).clamp(0.0, 1.0)


def base_colours(b: int, n: int, min_saturation: float, min_value: float, *, device, dtype, generator=None):
    """Random bright colours (B, N, 3): hue U(0, 1), saturation U(min_sat, 1), value U(min_val, 1)."""
    r = torch.rand(b, n, 3, device=device, dtype=dtype, generator=generator)
    lo = device_constant(("kaleidoscope.hsv_lo", float(min_saturation), float(min_value)),
                         lambda: torch.tensor([0.0, min_saturation, min_value], dtype=torch.float64), device, dtype)
    return hsv_to_rgb(lo + (1 - lo) * r)


def render(x, latent, masks, edges, colours, *, transparency):
    """Paint translucent shapes (base colour + offset) and |e|-bright outlines; latent (B, 3N + HW)."""
    b, n = colours.shape[:2]
    h, w = x.shape[-2:]
    offsets, brightness = latent[:, :3 * n].view(b, n, 3), latent[:, 3 * n:].view(b, 1, h, w)
    paint = torch.einsum("bnhw,bnc->bchw", masks, colours + offsets)                 # overlaps add up
    inside = masks.amax(1, keepdim=True) > 0                                          # (B, 1, H, W)
    out = torch.where(inside, transparency * x + paint, x)
    out = torch.where(edges > 0, brightness.abs().expand_as(out), out)                # outlines: grey |e|
    return out.clamp(0.0, 1.0)


def kaleidoscope(model, x, y, *, eps=0.1, steps=30, step_size=0.005, num_shapes=5, shape_size=4.0,
                 transparency=0.2, min_value=0.8, min_saturation=0.7, edge_width=5, direction=1, loss_fn=None,
                 generator=None):
    """Kaleidoscope attack: sign-step PGD on colour offsets and outline brightness; see the module docstring."""
    check_inputs(x, y, eps)
    if x.shape[1] != 3:
        raise ValueError(f"kaleidoscope needs RGB images (C = 3), got C = {x.shape[1]}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(step_size, torch.Tensor) and not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size!r}")
    if int(num_shapes) != num_shapes or num_shapes < 1 or shape_size <= 0:
        raise ValueError(f"need integer num_shapes >= 1 and shape_size > 0, got {num_shapes!r}, {shape_size!r}")
    if int(edge_width) != edge_width or edge_width < 1:
        raise ValueError(f"edge_width must be an integer >= 1, got {edge_width!r}")
    for name, value in (("transparency", transparency), ("min_value", min_value), ("min_saturation", min_saturation)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    b, _, h, w = x.shape
    n = int(num_shapes)
    kw = {"device": x.device, "dtype": x.dtype, "generator": generator}
    eps_b = per_sample(eps, x).view(b, 1)                                               # (B, 1)
    masks = shape_masks(b, n, h, w, shape_size, **kw)                                   # (B, N, H, W)
    edges = edge_rings(masks, int(edge_width))                                          # (B, 1, H, W)
    colours = base_colours(b, n, min_saturation, min_value, **kw)                       # (B, N, 3)
    offsets = eps_b * (2 * torch.rand(b, 3 * n, **kw) - 1)                              # U[-eps, eps]
    brightness = eps_b * torch.rand(b, h * w, **kw)                                     # U[0, eps]
    latent = torch.cat([offsets, brightness], dim=1)                                    # (B, 3N + HW)

    def project(z):
        return torch.maximum(torch.minimum(z, eps_b), -eps_b)

    def draw(z):
        return render(x, z, masks, edges, colours, transparency=transparency)

    x_adv = latent_pgd(model, x, y, latent, draw, project, steps=int(steps), step_size=step_size,
                       direction=direction, loss_fn=loss_fn, step_rule="sign")
    # DEVIATION: eps = 0 returns x (the reference paints the shapes at any eps) -- the attack contract (README.md)
    return torch.where(per_sample(eps, x) > 0, x_adv, x)
