"""Snow attack: bright diagonal flakes on a wintery-discoloured image (Kaufmann et al. 2023, "Testing Robustness
Against Unforeseen Adversaries", arXiv 1908.08016; reference code
https://github.com/centerforaisafety/adversarial-corruptions/blob/main/attacks/snow.py, whose CIFAR-10 levels take
eps from models/cifar10/cifar10_config.py and step size / steps from models.sh).

Fixed random structure (drawn once per call, torch RNG):
  mask  (B, L, H, W): an independent Bernoulli(1/g^2) per entry, g = grid_size (CIFAR 10 -> about 10 flakes per
        layer, 51 per image); random positions, not a grid (as the reference, kept).
  kernels (B, L, k, k), k = flake_size (CIFAR 3): a streak through the kernel centre to a random endpoint in the
        lower-right quadrant, mirrored through the centre; width 1, 3 or 5 with probabilities 0.6 / 0.3 / 0.1; all
        of an image's kernels flipped left-right with probability 0.5; then a Gaussian blur of size blur_size with
        sigma ~ U(10, 15) (CIFAR 1 = none). On CIFAR every kernel is a 3 x 3 diagonal, "\\" or "/" per image.
Latent:  flake intensities s (B, L, H, W), L = layers (5); only the masked entries are ever non-zero.
Render:  snow = sum_l conv2d((s_l * mask_l)^4, kernel_l)           (exponent = normalizing_constant 4;
                                                                    one grouped conv over the whole batch)
         wintery = (1 - d) x + d max(x, 1.5 luma(x) + 0.5)          (d = discolour 0.15, luma = Rec. 709 weights)
         x_adv = clamp(wintery + snow, 0, 1)                         (the same grey snow on R, G and B)
Constraint: ||s||_2 <= eps per example over the whole (L, H, W) tensor, yet SIGN steps (as the reference).
Init:    dense exp(-U / snow_init) (snow_init 5, values in [0.82, 1]) projected onto the l_2 ball, THEN masked
         (as the reference, kept): the initial snow is nearly invisible. Masked entries get zero gradient, sign(0) = 0.
Step:    s <- P_{||.||_2 <= eps}(s + step_size * direction * sign(grad_s))      (latent_pgd, step_rule "sign")

Defaults: the CIFAR-10 "medium" level of the reference: eps 4, steps 20, step_size 0.2, flake size 3,
5 layers, grid size 10, exponent 4, discolour 0.15, blur size 1. LEVELS holds low / medium / high.

Deviations from the reference:
- eps = 0 returns x exactly (attack contract, README.md): the reference discolours the image at any
  eps. Here an example with eps = 0 is returned unchanged; examples with eps > 0 are discoloured as in the reference.
- Flake kernels are rendered analytically on the device (the reference draws them with a numpy anti-aliased
  thick-line routine in a Python loop): tap value = clip((width + 1) / 2 - dist, 0, 1) in the streak's own
  quadrants (u v >= 0, where the reference's one-sided line spans reach), clip(1 - dist, 0, 1) elsewhere;
  dist = Euclidean distance from the tap to the mirrored segment. On the 3 x 3 CIFAR kernels: width 1 gives the
  diagonal 1, the four side taps 0.29 (the reference's line drawing: 0.354), far corners 0; width >= 3 gives ones
  except the two far corners (0), as the reference.
- |s|^4 instead of s^4 (identical for the even default exponent; defined for any exponent).

eps may be a float or a per-example (B,) tensor; direction +1 (maximise the loss) or -1, or a (B,) tensor.
generator (if given) must live on x's device.

Depends on: attacks/_common.py
"""

import torch
import torch.nn.functional as F

from attacks._common import check_inputs, device_constant, latent_pgd, per_sample, project_l2

# CIFAR-10 levels of the reference (eps: models/cifar10/cifar10_config.py; step size / steps: models.sh)
LEVELS = {
    "low": {"eps": 3.0, "steps": 20, "step_size": 0.2},
    "medium": {"eps": 4.0, "steps": 20, "step_size": 0.2},
    "high": {"eps": 5.0, "steps": 20, "step_size": 0.2},
}
EPS_MEANING = "l_2 (per image) on the sparse flake intensities (B x 5 x H x W)"
FLAKE_WIDTHS = (1.0, 3.0, 5.0)          # streak widths in px and their probabilities (reference snow.py)
FLAKE_WIDTH_PROBS = (0.6, 0.3, 0.1)
KERNEL_SIGMA = (10.0, 15.0)             # sigma range of the optional flake blur
LUMA = (0.2126, 0.7152, 0.0722)         # Rec. 709 luma weights used by the reference's discolouration
SNOW_INIT = 5.0                         # init exp(-U / SNOW_INIT)


def flake_kernels(b: int, layers: int, size: int, blur_size: int, *, device, dtype, generator=None):
    """Random streak kernels (B, L, k, k), built for all B * L kernels at once; see the module docstring."""
    n, c = b * layers, size // 2
    kw = {"device": device, "generator": generator}
    end = torch.randint(1, c + 1, (n, 1, 1, 2), **kw).to(dtype)           # endpoint offset (dx, dy) in [1, c]^2
    probs = device_constant("snow.width_probs", lambda: torch.tensor(FLAKE_WIDTH_PROBS), device)
    widths = device_constant("snow.widths", lambda: torch.tensor(FLAKE_WIDTHS, dtype=torch.float64), device, dtype)
    width = widths[torch.multinomial(probs, n, replacement=True, generator=generator)].view(n, 1, 1)
    t = torch.arange(-c, c + 1, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(t, t, indexing="ij")
    taps = torch.stack([gx, gy], -1)                                        # (k, k, 2) offsets from the centre
    # distance from every tap to the segment [-end, +end] (the streak mirrored through the centre)
    along = ((taps * end).sum(-1) / (end * end).sum(-1)).clamp(-1.0, 1.0)   # (n, k, k)
    dist = (taps - along[..., None] * end).norm(dim=-1)
    # DEVIATION: analytic streaks for all kernels at once (reference: numpy line drawing in a loop) -- vectorised
    # trapezoid profile across the streak: full within (width - 1) / 2 of the centre line, then a linear fall-off;
    # the thick part only in the streak's own quadrants (u v >= 0), where the reference's one-sided line spans
    # reach; elsewhere the 1-px anti-aliased core (so 3 x 3 kernels of width >= 3 keep their far corners at 0)
    thick = (width + 1) / 2 - dist
    kern = torch.where(gx * gy >= 0, thick, 1 - dist).clamp(0.0, 1.0).view(b, layers, size, size)
    flip = torch.rand(b, 1, 1, 1, device=device, generator=generator) < 0.5  # per image: "\" -> "/"
    kern = torch.where(flip, kern.flip(-1), kern)
    if blur_size > 1:   # per-kernel Gaussian blur (reflect padding), sigma ~ U(10, 15); ImageNet setting
        sigma = KERNEL_SIGMA[0] + (KERNEL_SIGMA[1] - KERNEL_SIGMA[0]) * torch.rand(n, 1, **kw).to(dtype)
        r = torch.arange(blur_size, device=device, dtype=dtype) - (blur_size - 1) / 2
        g = torch.exp(-0.5 * (r / sigma) ** 2)
        g = g / g.sum(1, keepdim=True)                                      # (n, blur_size)
        p = (blur_size - 1) // 2, blur_size // 2
        out = F.pad(kern.reshape(1, n, size, size), (p[0], p[1], 0, 0), mode="reflect")
        out = F.conv2d(out, g.view(n, 1, 1, blur_size), groups=n)
        out = F.pad(out, (0, 0, p[0], p[1]), mode="reflect")
        kern = F.conv2d(out, g.view(n, 1, blur_size, 1), groups=n).view(b, layers, size, size)
    return kern


def discolour(x: torch.Tensor, strength: float) -> torch.Tensor:
    """The reference's wintery tint: (1 - d) x + d max(x, 1.5 luma(x) + 0.5)."""
    weights = device_constant("snow.luma", lambda: torch.tensor(LUMA, dtype=torch.float64).view(1, 3, 1, 1),
                              x.device, x.dtype)
    luma = (weights * x).sum(1, keepdim=True)
    return (1 - strength) * x + strength * torch.maximum(x, 1.5 * luma + 0.5)


def render(x_wintery: torch.Tensor, intensity: torch.Tensor, mask: torch.Tensor, kernels: torch.Tensor, *,
           normalizing_constant: float) -> torch.Tensor:
    """clamp(wintery + sum_l conv((s_l mask_l)^p, kernel_l), 0, 1); one grouped conv2d over the batch."""
    b, layers, h, w = intensity.shape
    k = kernels.shape[-1]
    flakes = (intensity * mask).abs() ** normalizing_constant                    # (B, L, H, W)
    snow = F.conv2d(flakes.reshape(1, b * layers, h, w), kernels, padding=k // 2, groups=b)   # (1, B, H, W)
    return (x_wintery + snow.view(b, 1, h, w)).clamp(0.0, 1.0)


def snow(model, x, y, *, eps=4.0, steps=20, step_size=0.2, flake_size=3, layers=5, grid_size=10,
         normalizing_constant=4.0, discolour_strength=0.15, blur_size=1, direction=1, loss_fn=None,
         generator=None):
    """Snow attack: sign-step PGD on l_2-bounded sparse flake intensities; see the module docstring."""
    check_inputs(x, y, eps)
    if x.shape[1] != 3:
        raise ValueError(f"snow needs RGB images (C = 3), got C = {x.shape[1]}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(step_size, torch.Tensor) and not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size!r}")
    if int(flake_size) != flake_size or flake_size < 3 or flake_size % 2 == 0:
        raise ValueError(f"flake_size must be an odd integer >= 3, got {flake_size!r}")
    if int(layers) != layers or layers < 1 or grid_size < 1 or int(blur_size) != blur_size or blur_size < 1:
        raise ValueError(f"layers, grid_size and blur_size must be >= 1, got {layers!r}, {grid_size!r}, "
                         f"{blur_size!r}")
    if not 0 <= discolour_strength <= 1 or normalizing_constant <= 0:
        raise ValueError(f"need discolour_strength in [0, 1] and normalizing_constant > 0, got "
                         f"{discolour_strength!r}, {normalizing_constant!r}")
    b, _, h, w = x.shape
    kw = {"device": x.device, "dtype": x.dtype, "generator": generator}
    eps_b = per_sample(eps, x)                                                       # (B, 1, 1, 1)
    mask = (torch.rand(b, int(layers), h, w, **kw) < 1.0 / grid_size ** 2).to(x.dtype)   # Bernoulli(1/g^2)
    kernels = flake_kernels(b, int(layers), int(flake_size), int(blur_size), **kw)
    dense = torch.exp(-torch.rand(b, int(layers), h, w, **kw) / SNOW_INIT)
    intensity = project_l2(dense, eps_b) * mask          # reference order: project the dense init, then mask
    x_wintery = discolour(x, discolour_strength)

    def project(s):
        return project_l2(s, eps_b)

    def draw(s):
        return render(x_wintery, s, mask, kernels, normalizing_constant=normalizing_constant)

    x_adv = latent_pgd(model, x, y, intensity, draw, project, steps=int(steps), step_size=step_size,
                       direction=direction, loss_fn=loss_fn, step_rule="sign")
    # DEVIATION: eps = 0 returns x (the reference discolours at any eps) -- the attack contract (README.md)
    return torch.where(eps_b > 0, x_adv, x)
