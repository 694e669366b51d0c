"""Square Attack (Andriushchenko et al., ECCV 2020): score-based random search, as AutoAttack runs it.

Private module of attacks/autoattack.py (reference: autoattack/square.py of https://github.com/fra31/auto-attack,
as the standard version runs it: 5000 queries, p_init 0.8, margin loss, 1 restart, no rescaled schedule).
Only forward passes (no gradients).

Loss: the margin m = z_y - max_{i != y} z_i (minimised); a point is broken once m <= 0, and only points with m > 0
keep being queried. Each iteration proposes one change per point and keeps it if it lowers the margin.
The side of the square window is s = round(sqrt(p * d / c)) (d = c h w), with p = p_init halved at iterations
10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 (AutoAttack's p_selection).
  l_inf: start with vertical stripes x + eps * (+-1 per channel and column); proposal: set one s x s window to
         x_best + 2 eps * (+-1 per channel), then clip to the eps-ball and the box. (The window position and the
         channel signs are shared by the batch, as in AutoAttack.)
  l_2:   start with a 5 x 5 grid of "pseudo-Gaussian" blocks (concentric rectangles weighted 1/(k+1)^2, top half
         positive, bottom half negative) with random signs per point and channel, rescaled to ||delta||_2 = eps;
         proposal: move the mass of a second random window into a first one (window 2 zeroed, window 1 set to
         old_window_1 / ||old_window_1|| + new pseudo-Gaussian block, rescaled so that ||delta||_2 can reach eps),
         then delta is rescaled to ||delta||_2 = eps and the image clipped to the box (s odd, >= 3).
  l_1:   the l_2 scheme with every l_2 norm replaced by the l_1 norm (see deviations).

Randomness: per-point draws have the shape of the FULL batch and are indexed by the points still attacked, so a
point's trajectory does not depend on which other points are attacked.

Deviations from the reference:
  - l_1 proposal: our own l_1 transcription of the l_2 rule, not AutoAttack's Square-L1 branch (norm 'L1' in
    autoattack/square.py, added in 2021, which differs in its details): the l_2 update with l_1 norms (budget
    eps - ||delta||_1 instead of sqrt(eps^2 - ||delta||_2^2)), rescaled to ||delta||_1 = eps before clipping to the
    box (clipping is then the exact l_1-ball-and-box projection).
    # DEVIATION tagged in _propose_l2_l1
Depends on: torch only (no package-internal import).
"""

import math

import torch

P_INIT = 0.8
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)   # p_selection breakpoints (iterations)


def p_selection(it, p_init=P_INIT):
    """Fraction of pixels changed at iteration `it`: p_init / 2^j after the j-th breakpoint."""
    return p_init / 2 ** sum(it > t for t in P_HALVINGS)


def _rect_profile(rows, cols, device, dtype):
    """Concentric rectangles around (rows//2, cols//2): value = sum_{k >= ring} 1/(k+1)^2, unit l_2 norm."""
    n_rings = max(rows // 2 + 1, cols // 2 + 1)
    tail = (1.0 / torch.arange(1, n_rings + 1, device=device, dtype=dtype) ** 2).flip(0).cumsum(0).flip(0)
    i = torch.arange(rows, device=device)[:, None]
    j = torch.arange(cols, device=device)[None, :]
    ring = torch.maximum((i - rows // 2).abs(), (j - cols // 2).abs())       # (rows, cols)
    val = tail[ring]
    return val / val.norm()


def pseudo_gaussian(s, norm, generator, device, dtype):
    """(s, s) block: positive rectangles on the top half, negative on the bottom, randomly transposed; unit norm."""
    return _pseudo_gaussian(s, norm, generator, device, dtype)[0]


def _pseudo_gaussian(s, norm, generator, device, dtype):
    """pseudo_gaussian's block (contiguous) and whether it was transposed (a 1-element bool tensor): the coin flip
    stays on the device (torch.where), so no host sync."""
    block = torch.cat([_rect_profile(s // 2, s, device, dtype), -_rect_profile(s - s // 2, s, device, dtype)])
    scale = block.abs().sum() if norm == "l1" else block.norm()           # the same for the transpose
    flipped = torch.rand(1, generator=generator, device=device) > 0.5
    return torch.where(~flipped, block, block.t()) / scale, flipped


def _norm(t, norm, dims):
    """l_2 or l_1 norm of t over dims (kept)."""
    return t.abs().sum(dims, keepdim=True) if norm == "l1" else t.pow(2).sum(dims, keepdim=True).sqrt()


def _init(x, full_idx, b_full, norm, eps, generator):
    """Starting point of the search for the points x (= full batch rows full_idx)."""
    c, h, w = x.shape[1:]
    dev, dt = x.device, x.dtype
    if norm == "linf":   # vertical stripes +-eps per channel and column
        signs = _signs((b_full, c, 1, w), generator, dev, dt)[full_idx]
        return (x + eps * signs).clamp(0.0, 1.0)
    s = h // 5
    delta = torch.zeros_like(x)
    top, left = (h - 5 * s) // 2, (w - (w // s) * s) // 2
    for r in range(top, top + (h // s) * s, s):        # a fixed 5 x 5 grid of blocks (init only, not per step)
        for col in range(left, left + (w // s) * s, s):
            signs = _signs((b_full, c, 1, 1), generator, dev, dt)[full_idx]
            delta[:, :, r:r + s, col:col + s] += pseudo_gaussian(s, norm, generator, dev, dt) * signs
    return (x + delta / (_norm(delta, norm, (1, 2, 3)) + 1e-12) * eps).clamp(0.0, 1.0)


def _signs(shape, generator, device, dtype):
    """Uniform random +-1 tensor."""
    return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1


def _window(h, w, s, generator, device):
    """Random top-left corner of an s x s window (AutoAttack draws in [0, h - s)), as two 1-element device tensors:
    the window is then cut with index tensors or masks, never by reading the corner on the host (no sync)."""
    vh = torch.randint(0, max(h - s, 1), (1,), generator=generator, device=device)
    vw = torch.randint(0, max(w - s, 1), (1,), generator=generator, device=device)
    return vh, vw


def _window_mask(h, w, s, vh, vw, dtype):
    """(h, w) 0/1 mask of the window [vh, vh + s) x [vw, vw + s), clipped to the image like a slice."""
    rows = torch.arange(h, device=vh.device)
    cols = torch.arange(w, device=vw.device)
    inside_r = (rows >= vh) & (rows < vh + s)
    inside_c = (cols >= vw) & (cols < vw + s)
    return (inside_r[:, None] & inside_c[None, :]).to(dtype)


def _window_index(s, vh, vw):
    """Index tensors (rows (s, 1), cols (1, s)) of the s x s window at (vh, vw), for t[:, :, rows, cols]."""
    offsets = torch.arange(s, device=vh.device)
    return (vh + offsets)[:, None], (vw + offsets)[None, :]


def _propose_linf(x, x_best, eps, p, generator):
    """l_inf proposal: one s x s window of x_best moved by 2 eps * (+-1 per channel), then projected."""
    c, h, w = x.shape[1:]
    s = max(int(round(math.sqrt(p * c * h * w / c))), 1)
    vh, vw = _window(h, w, s, generator, x.device)
    # x_best + mask * change: outside the window x_best + 0 = x_best, inside x_best + change (= the in-place add)
    x_new = x_best + _window_mask(h, w, s, vh, vw, x.dtype) * (2 * eps * _signs((c, 1, 1), generator, x.device,
                                                                                   x.dtype))
    return torch.minimum(torch.maximum(x_new, x - eps), x + eps).clamp(0.0, 1.0)


def _propose_l2_l1(x, x_best, eps, p, norm, signs, generator):
    """l_2 / l_1 proposal: move the mass of window 2 into window 1 plus a new pseudo-Gaussian block; ||delta|| = eps."""
    c, h, w = x.shape[1:]
    s = max(int(round(math.sqrt(p * c * h * w / c))), 3)
    s += 1 - s % 2                                                          # odd side
    if s > min(h, w):
        raise ValueError(f"Square {norm}: window side {s} exceeds the image ({h} x {w}); lower p_init")
    delta = x_best - x
    vh, vw = _window(h, w, s, generator, x.device)
    vh2, vw2 = _window(h, w, s, generator, x.device)
    # windows cut with index tensors and masks (corners stay on the device)
    win1 = (slice(None), slice(None)) + _window_index(s, vh, vw)
    mask2 = _window_mask(h, w, s, vh2, vw2, x.dtype)
    union = torch.maximum(_window_mask(h, w, s, vh, vw, x.dtype), mask2)
    norm_win1 = _norm(delta[win1], norm, (2, 3))                            # (n, c, 1, 1)
    norm_image = _norm(delta, norm, (1, 2, 3))                              # (n, 1, 1, 1)
    norm_union = _norm(delta * union, norm, (1, 2, 3))
    block, flipped = _pseudo_gaussian(s, norm, generator, x.device, x.dtype)
    new = block * signs + delta[win1] / (1e-12 + norm_win1)
    if norm == "l2":
        budget = ((eps ** 2 - norm_image ** 2).clamp_min(0.0) / c + norm_union ** 2).sqrt()
    else:   # DEVIATION: l_1 transcription of the l_2 rule (not AutoAttack's own Square-L1 update)
        budget = (eps - norm_image).clamp_min(0.0) / c + norm_union
    # the window norm summed in the memory order of the block, as when the transposed block was a transposed view
    # (row-major, or column-major if transposed): the same float rounding as the host-side flip had
    norm_new = torch.where(flipped, _norm(new.transpose(2, 3).contiguous(), norm, (2, 3)), _norm(new, norm, (2, 3)))
    new = new / (norm_new + 1e-12) * budget
    delta = torch.where(mask2 > 0, torch.zeros_like(delta), delta)
    delta[win1] = new
    return (x + delta / (_norm(delta, norm, (1, 2, 3)) + 1e-12) * eps).clamp(0.0, 1.0)


def _margin(model, x, y):
    """z_y - max_{i != y} z_i (B,)."""
    logits = model(x)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return z_y - logits.scatter(1, y[:, None], float("-inf")).amax(1)


def square(model, x, y, todo, *, norm, eps, n_queries=5000, p_init=P_INIT, generator=None):
    """Square Attack on the points in `todo` (B,) bool. Returns (x_adv, broken) like the other components."""
    bsz, c = x.shape[0], x.shape[1]
    x_adv, broken = x.clone(), torch.zeros(bsz, dtype=torch.bool, device=x.device)
    idx = todo.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x_adv, broken
    with torch.no_grad():
        xs, ys = x[idx], y[idx]
        x_best = _init(xs, idx, bsz, norm, eps, generator)
        margin_min = _margin(model, x_best, ys)
        for it in range(n_queries):
            # the one host sync of a query: the points still to attack (a data-dependent sub-batch, as AutoAttack)
            act = (margin_min > 0).nonzero().squeeze(1)
            if act.numel() == 0:
                break
            p = p_selection(it, p_init)
            if norm == "linf":
                x_new = _propose_linf(xs[act], x_best[act], eps, p, generator)
            else:
                signs = _signs((bsz, c, 1, 1), generator, x.device, x.dtype)[idx[act]]
                x_new = _propose_l2_l1(xs[act], x_best[act], eps, p, norm, signs, generator)
            margin = _margin(model, x_new, ys[act])
            accept = margin < margin_min[act]
            margin_min[act] = torch.where(accept, margin, margin_min[act])
            x_best[act] = torch.where(accept.view(-1, 1, 1, 1), x_new, x_best[act])   # no boolean index
        hit = margin_min <= 0
    x_adv[idx] = torch.where(hit.view(-1, 1, 1, 1), x_best, x_adv[idx])
    broken[idx] = hit
    return x_adv, broken
