"""Helpers shared by the attacks in this package (the only internal dependency of each attack module).

Copy an attack into another project by copying `<name>.py` and this file.

Contents
    per_sample(v, x)            float or (B,) tensor -> (B, 1, 1, 1) tensor on x's device/dtype
    check_inputs(x, y, eps)     validate the attack inputs (raises ValueError with the bad value; one host sync)
    device_constant(key, build, device, dtype)  a constant built and moved to the device once, then cached
    kth_smallest(values, k)     per-row k-th smallest value without a sort or a host sync
    ce_losses(logits, y)        default per-example loss (B,)
    project_linf / project_l2   projection of a perturbation onto the l_inf / l_2 ball
    project_l1_box(x, delta, eps)  exact projection onto {||delta||_1 <= eps} intersected with x+delta in [0,1]
    lp_norm(delta, p)           per-example l_p norm (B,)
    gaussian_kernel1d / gaussian_blur   separable Gaussian blur (plain conv2d, no torchvision)
    identity_grid, reference_grid  the base grids of the flow-based attacks (linspace; the reference's 2i/W - 1)
    latent_pgd(...)             the PGD loop on a latent variable used by the semantic attacks
"""

import math

import torch
import torch.nn.functional as F


def per_sample(v, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a float or a (B,) tensor to shape (B, 1, 1, 1) on x's device and dtype."""
    if isinstance(v, torch.Tensor):
        if v.dim() == 0:
            v = v.expand(x.shape[0])
        if v.shape != (x.shape[0],):
            raise ValueError(f"per-sample value must have shape ({x.shape[0]},), got {tuple(v.shape)}")
        return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return torch.full((x.shape[0],) + (1,) * (x.dim() - 1), float(v), device=x.device, dtype=x.dtype)


def check_inputs(x: torch.Tensor, y: torch.Tensor, eps=None) -> None:
    """Validate the shared attack contract's inputs; errors name the offending value.

    One host sync per call at most: the range of x and a tensor eps on x's device are checked by one combined
    reduction read once (the detailed messages are computed only on the error path).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor (B, C, H, W), got {type(x).__name__} "
                         f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', '')}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"y must be a tensor of shape ({x.shape[0]},), got {tuple(getattr(y, 'shape', ()))}")
    bad = []                                          # 0-d bool tensors on x's device, read together once
    if x.numel():
        lo, hi = torch.aminmax(x.detach())
        bad.append((lo < 0) | (hi > 1))
    if eps is not None:
        if isinstance(eps, torch.Tensor):
            e = eps.detach()
            e_bad = ((e < 0) | ~torch.isfinite(e)).any()
            if e.device == x.device:
                bad.append(e_bad)
            elif bool(e_bad):                         # eps on another device (e.g. CPU): its own check
                raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
        else:
            e = float(eps)
            if not (math.isfinite(e) and e >= 0):
                raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    if bad and bool(torch.stack(bad).any()):          # the one sync
        if x.numel() and bool(bad[0]):
            raise ValueError(f"x must lie in [0, 1], got range [{x.min().item():.4f}, {x.max().item():.4f}]")
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")


def device_constant(key, build, device, dtype=None) -> torch.Tensor:
    """A constant tensor (or tuple of tensors) built once per (key, device, dtype) and kept: renders call this in
    every step, so the constant is neither rebuilt nor copied host -> device per step (a blocking copy on CUDA).

    key: a hashable naming the constant (module-qualified, plus any value it depends on); build() -> CPU tensor(s),
    cast to `dtype` (None: keep their dtype) and moved to `device` once. The cached tensors are plain tensors
    (built outside inference mode, no grad) and must not be modified in place.
    """
    full_key = (key, torch.device(device), dtype)
    value = _DEVICE_CONSTANTS.get(full_key)
    if value is None:
        with torch.inference_mode(False), torch.no_grad():
            built = build()
            move = (lambda t: t.to(device=device, dtype=dtype or t.dtype))
            value = tuple(move(t) for t in built) if isinstance(built, tuple) else move(built)
        _DEVICE_CONSTANTS[full_key] = value
    return value


_DEVICE_CONSTANTS = {}   # device_constant's cache: a few small tensors per (key, device, dtype)


def kth_smallest(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-row k-th smallest value (B, 1) of values (B, d), k (B,) long in [1, d], without a sort or a host sync.

    Row i is padded with d - k_i entries -inf and k_i entries +inf; the d-th smallest of the padded row is then the
    k_i-th smallest of the row, so one torch.kthvalue with a fixed k serves every row (O(d) selection instead of an
    O(d log d) sort). Equal to values.sort(1).values.gather(1, k[:, None] - 1) for finite values.
    """
    d = values.shape[1]
    cols = torch.arange(d, device=values.device)
    pad = torch.full_like(values, float("inf")).masked_fill(cols[None, :] < (d - k)[:, None], float("-inf"))
    return torch.cat([values, pad], dim=1).kthvalue(d, dim=1, keepdim=True).values


def ce_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (B,): the default loss of every attack."""
    return F.cross_entropy(logits, y, reduction="none")


def lp_norm(delta: torch.Tensor, p) -> torch.Tensor:
    """Per-example l_p norm of a (B, ...) tensor, p in {inf, 2, 1}."""
    flat = delta.flatten(1)
    if p == float("inf") or p == "inf":
        return flat.abs().amax(1)
    if p == 2:
        return flat.norm(p=2, dim=1)
    if p == 1:
        return flat.abs().sum(1)
    raise ValueError(f"unknown norm {p!r}; choose from inf, 2, 1")


def project_linf(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Clip each coordinate to [-eps, eps]; eps is (B, 1, 1, 1)."""
    return torch.maximum(torch.minimum(delta, eps), -eps)


def project_l2(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Radially rescale each example onto the l_2 ball of radius eps (B, 1, 1, 1)."""
    norm = delta.flatten(1).norm(dim=1).view_as(eps)
    return delta * torch.clamp(eps / (norm + 1e-12), max=1.0)


def project_l1_box(x: torch.Tensor, delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean projection of delta onto {d : ||d||_1 <= eps, x + d in [0,1]} per example.

    "Mind the box" (Croce & Hein 2021), see README attacks notes. The solution is a soft threshold with box caps,
        d_i(lam) = sign(z_i) * clip(|z_i| - lam, 0, u_i),  u_i = room in the direction of z_i (1-x_i or x_i),
    with lam = 0 if that is inside the ball, else the lam > 0 with f(lam) = sum_i clip(|z_i| - lam, 0, u_i) = eps.
    f is piecewise linear and decreasing with breakpoints |z_i| - u_i (slope -1 starts) and |z_i| (slope -1 ends),
    so sorting the 2d breakpoints and a cumulative sum give f at every breakpoint in O(d log d); lam is then an
    exact linear interpolation inside the bracketing segment. Computed in float64 for an exact budget.
    """
    shape, dtype = delta.shape, delta.dtype
    z = delta.flatten(1).double()
    xf = x.flatten(1).double()
    e = eps.flatten().double()                                           # (B,)
    sign = torch.sign(z)
    a = z.abs()
    u = torch.where(z >= 0, 1.0 - xf, xf).clamp_min(0.0)                 # room toward the sign of z
    boxed = torch.minimum(a, u)                                          # lam = 0 solution (box clip only)
    need = boxed.sum(1) > e                                              # examples outside the l1 ball

    # breakpoints and slope changes of f: at |z|-u the term starts decreasing (slope -1), at |z| it stops (+1)
    bp = torch.cat([a - u, a], dim=1)                                    # (B, 2d)
    dslope = torch.cat([-torch.ones_like(a), torch.ones_like(a)], dim=1)
    bp, order = bp.sort(dim=1)
    dslope = dslope.gather(1, order)
    slope = dslope.cumsum(1)                                             # slope of f right after each breakpoint
    gaps = bp.diff(dim=1)                                                # (B, 2d-1)
    f0 = u.sum(1, keepdim=True)                                          # f at the smallest breakpoint
    f_at = torch.cat([f0, f0 + (slope[:, :-1] * gaps).cumsum(1)], dim=1)  # f(bp_j), non-increasing
    # first breakpoint where f <= eps; lam lies on the segment ending there
    j = (f_at > e[:, None]).sum(1).clamp(1, bp.shape[1] - 1)             # (B,)
    jm = (j - 1)[:, None]
    f_lo, b_lo, s_lo = f_at.gather(1, jm), bp.gather(1, jm), slope.gather(1, jm)
    lam = b_lo + (e[:, None] - f_lo) / torch.where(s_lo < 0, s_lo, -torch.ones_like(s_lo))
    lam = torch.where(need[:, None], lam.clamp_min(0.0), torch.zeros_like(lam))
    d = sign * torch.minimum((a - lam).clamp_min(0.0), u)
    # guard the last ulp: rescaling toward 0 keeps x + d inside the box
    n1 = d.abs().sum(1, keepdim=True)
    d = d * torch.clamp(e[:, None] / n1.clamp_min(1e-30), max=1.0)
    return d.to(dtype).view(shape)


def gaussian_kernel1d(sigma: float, radius: int = None, device=None, dtype=None) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel of length 2*radius+1 (radius defaults to ceil(3 sigma))."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    radius = int(math.ceil(3 * sigma)) if radius is None else int(radius)
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype or torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int = None) -> torch.Tensor:
    """Separable depthwise Gaussian blur with reflect padding (B, C, H, W) -> same shape."""
    k = gaussian_kernel1d(sigma, radius, device=x.device, dtype=x.dtype)
    r, c = k.numel() // 2, x.shape[1]
    out = F.pad(x, (r, r, 0, 0), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, r, r), mode="reflect")
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def identity_grid(b: int, h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """Sampling grid (B, H, W, 2) that reproduces the image exactly under grid_sample(align_corners=True)."""
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).unsqueeze(0).expand(b, h, w, 2)


def reference_grid(b: int, h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """The base grid (B, H, W, 2) of the reference's whirlpool, glitch and klotski: x = 2j/W - 1, y = 2i/H - 1.
    Sampled as the reference does, with grid_sample(align_corners=False), it reads pixel (i, j) at (i - 1/2, j - 1/2):
    half a pixel up and left even at zero displacement, the first row and column half blended with the padding."""
    ys = torch.arange(h, device=device, dtype=dtype) * (2.0 / h) - 1
    xs = torch.arange(w, device=device, dtype=dtype) * (2.0 / w) - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).unsqueeze(0).expand(b, h, w, 2)


def latent_pgd(model, x, y, latent, render, project, *, steps, step_size, direction=1, loss_fn=None,
               step_rule="sign"):
    """PGD on a latent variable: latent <- project(latent + step_size * direction * step(grad)), then render.

    The common optimisation framework of the unforeseen attacks (Kaufmann et al. 2023, every attack of
    https://github.com/centerforaisafety/adversarial-corruptions/tree/main/attacks follows it):
    `render(latent) -> x_adv` is differentiable, `project(latent) -> latent` enforces the constraint.
    step_rule "sign" (l_inf-style) or "l2" (per-sample gradient normalised to unit l_2 norm).
    Gradients are taken with torch.autograd.grad w.r.t. the latent only (no parameter .grad is written).
    Returns the rendered image of the final latent, detached and clamped to [0, 1].
    """
    loss_fn = ce_losses if loss_fn is None else loss_fn
    dirn = per_sample(direction, x).flatten()
    size = step_size if isinstance(step_size, torch.Tensor) else float(step_size)   # a float: no host->device copy
    latent = project(latent.detach())
    for _ in range(steps):
        latent.requires_grad_(True)
        objective = (dirn * loss_fn(model(render(latent)), y)).sum()
        (grad,) = torch.autograd.grad(objective, [latent])
        if step_rule == "sign":
            step = grad.sign()
        elif step_rule == "l2":
            step = grad / (grad.flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1))) + 1e-8)
        else:
            raise ValueError(f"unknown step_rule {step_rule!r}; choose from 'sign', 'l2'")
        size_b = size.view(-1, *([1] * (grad.dim() - 1))) if isinstance(size, torch.Tensor) and size.dim() == 1 \
            else size
        latent = project(latent.detach() + size_b * step)
    with torch.no_grad():
        return render(latent).clamp(0.0, 1.0).detach()
