"""ppgd: Perceptual PGD (Laidlaw, Singla & Feizi, ICLR 2021, "Perceptual Adversarial Robustness"), LPIPS-bounded.

Reference (upstream): https://github.com/cassidylaidlaw/perceptual-advex, perceptual_advex/perceptual_attacks.py
(PerceptualPGDAttack with FirstOrderStepPerceptualAttack and the Newton projection).

Distance (upstream's "LPIPS"): phi(x) = concatenation over the feature maps f_l of f_l normalised to unit l_2 norm
over channels at every spatial position (+1e-10), divided by sqrt(H_l W_l) and flattened;
d(x, x') = ||phi(x) - phi(x')||_2, i.e. the square root of the UN-weighted LPIPS (no learned channel weights).
The budget eps bounds d(x, x_adv).
Feature network (`lpips_net`):
  - "self" (default, self-bounded PAT): the attacked model's own `model.features(x) -> [layer1, .., layer4 outputs]`
    (our PreActResNet-18 exposes it). A model without a `features` method gets its maps from forward hooks
    (`hooked_features`): a hook on every submodule (model.named_modules(), not the root) records each 4-D tensor
    output of one forward of the model on x, in call order, and for each distinct spatial size (H, W) the LAST
    such output is kept (maps ordered by the first appearance of their size). Containers' hooks fire after their
    children's, so for a ResNet this is each stage's output (layer1, layer2, ...; for a pre-activation ResNet the
    next stage's first bn+ReLU of it, and at the last size the final bn). An in-place op on a recorded map
    (ReLU(inplace=True), `out += skip`) changes it together with its autograd history, so the maps stay valid for
    backward. A global pool's (B, C, 1, 1) output counts as a map; tuple / list outputs are skipped; a model with no
    4-D output raises a ValueError (pass a fixed network via lpips_net). Cost: one full forward of the model per phi
    call; the maps keep the autograd graph. The rule is ours (see the deviations).
    With "self", the distance changes with the checkpoint, so "PPGD eps=0.5" accuracies are NOT comparable across
    models or over fine-tuning.
  - any nn.Module / callable returning a list of feature maps (or one tensor): a FIXED network (e.g. a frozen copy of
    the initial pre-trained model, or a CIFAR AlexNet trained by us) gives one distance for every checkpoint; the
    paper's CIFAR-10 evaluation uses a CIFAR AlexNet ("alexnet_cifar", weights not available offline). Never
    downloads anything.
Objective (upstream's MarginLoss): margin loss m = min(max_{i != y} z_i - z_y, kappa), kappa = 1 (or
loss_fn(logits, y) if given), multiplied by `direction` and maximised.
Step: at the current point x_k, with J = d phi / dx at x_k and g = grad of the objective, solve (J^T J) v = g with
`cg_iters` conjugate-gradient iterations (a point stops once its residual^2 < 0.1), then
x_{k+1} = clip(x_k + lam v, 0, 1) with lam = step_size / ||J v|| (a step of length step_size in the perceptual
metric). Points with ||g|| < 1e-4 (e.g. margin already >= kappa) are not moved.
J v is a FINITE DIFFERENCE (phi(x + h u) - phi(x)) / h * ||v|| with u = v / ||v||, h = 1e-3, as the reference; J^T w
is a backward pass through phi. Why finite differences rather than torch.func.jvp: one plain forward per product,
and it works with any feature network (modules with in-place ops, custom autograd functions without forward-mode
formulas, hooks), which matters because lpips_net is user supplied; its O(h) error only perturbs the search direction
(v, lam), while the budget is enforced exactly by the projection below.
Projection onto {d(x, .) <= eps} after every step (and after the start): up to 10 Newton steps
x' <- clip(x' - (d - eps + 0.1) * 1.1 * grad d / ||grad d||^2, 0, 1) on the points still outside (0.1 overshoot, as
upstream); points still outside afterwards fall back to 10 bisection steps on the segment [x, x'_unprojected]
(the largest feasible fraction is kept), so every output satisfies d(x, x_adv) <= eps.
Start: x + N(0, 1e-4^2), clipped (upstream PerceptualPGDAttack starts from x + N(0, 0.01^2); see the deviations).
Defaults: eps (bound) 0.5, step_size 2 eps / steps, cg_iters 5, h 1e-3, kappa 1 (upstream's defaults).
steps = 10 is the cheaper TRAINING setting (self-bounded PAT trains with 10 iterations); use steps=40 for evaluation
(the paper's CIFAR-10 setting).
Cost per iteration (B images): 1 forward+backward of the model, 1 forward of phi with graph, per CG iteration one
phi forward (finite difference) + one backward through phi, 1 phi forward for lam, and 1-10 phi forward+backward in
the projection (see README for measured ratios).

Deviations from the reference:
  - start noise std 1e-4 instead of upstream PerceptualPGDAttack's 0.01; see START_STD.
  - finite difference along the unit direction v / ||v|| (rescaled by ||v||) instead of along v itself -- keeps the
    probe at a fixed size h whatever the scale of v.  # DEVIATION tagged in _jvp_fd
  - the start is clipped to [0, 1] (upstream leaves it outside the box until the first step) -- the model only ever
    sees valid images.  # DEVIATION tagged in ppgd
  - CG stops per point (residual^2 < 0.1) instead of when every point of the batch has converged, and the bisection
    fallback runs only on the points Newton did not project (upstream re-bisects the whole batch) -- per-point results
    do not depend on the rest of the batch.  # DEVIATION tagged in _solve_cg and _project
  - lpips_net="self" on a model without features(): maps taken by forward hooks (upstream needs a FeatureModel
    with features()), so ppgd runs on any nn.Module.  # DEVIATION tagged in hooked_features
Depends on: attacks/_common.py
"""

import math

import torch

from attacks._common import check_inputs, per_sample

LPIPS_NORM_EPS = 1e-10      # added to the channel norm (upstream normalize_flatten_features)
FD_H = 1e-3                 # finite-difference step h (upstream)
CG_TOL = 0.1                # CG stops when the squared residual is below this (upstream)
GRAD_TOL = 1e-4             # points with ||grad|| below this are left unchanged (upstream)
START_STD = 1e-4            # DEVIATION: std of the Gaussian start (upstream PerceptualPGDAttack: 0.01)
NEWTON_ITERS, OVERSHOOT, BISECT_ITERS = 10, 0.1, 10   # projection (upstream)
KAPPA = 1.0                 # margin-loss cap
EPS_MEANING = "square-rooted, un-weighted LPIPS distance d(x, x_adv) (feature network: lpips_net)"


def hooked_features(model):
    """Callable x -> feature maps of `model` by forward hooks, for models without features() (rule: module doc).

    One forward of model(x) per call; per spatial size (H, W) the last 4-D tensor output of any submodule is kept.
    """
    # DEVIATION: upstream's "self" distance needs a FeatureModel with features() (perceptual_advex/models.py in
    # https://github.com/cassidylaidlaw/perceptual-advex); without one, ours takes the maps by forward hooks

    def phi(x):
        modules = [m for name, m in model.named_modules() if name]   # every submodule once (shared too), no root
        maps = {}                                                     # (H, W) -> last map; first-appearance order

        def record(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                maps[tuple(output.shape[2:])] = output

        handles = [m.register_forward_hook(record) for m in modules]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
        if not maps:
            raise ValueError(f"lpips_net='self': {type(model).__name__} has no features() method and none of its "
                             f"submodules returned a 4-D feature map; pass a fixed feature network via lpips_net")
        return list(maps.values())
    return phi


def feature_fn(model, lpips_net):
    """The feature network as a callable x -> list of maps: for "self" model.features if it exists, else the maps
    taken by forward hooks (hooked_features); otherwise lpips_net itself."""
    if isinstance(lpips_net, str):
        if lpips_net != "self":
            raise ValueError(f"lpips_net must be 'self' or an nn.Module returning feature maps, got {lpips_net!r}")
        features = getattr(model, "features", None)
        return features if callable(features) else hooked_features(model)
    if callable(lpips_net):
        return lpips_net
    raise ValueError(f"lpips_net must be 'self' or an nn.Module returning feature maps, got {lpips_net!r}")


def lpips_features(phi, x):
    """phi-vector (B, D): each map unit-normalised over channels per position, / sqrt(H W), flattened, concatenated."""
    maps = phi(x)
    maps = [maps] if isinstance(maps, torch.Tensor) else list(maps)
    flat = []
    for f in maps:
        f = f if f.dim() == 4 else f.reshape(f.shape[0], f.shape[1], 1, 1)
        f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + LPIPS_NORM_EPS)
        flat.append((f / math.sqrt(f.shape[2] * f.shape[3])).flatten(1))
    return torch.cat(flat, dim=1)


def lpips_distance(phi, x1, x2):
    """Square-rooted un-weighted LPIPS distance (B,) between x1 and x2 with feature network phi (upstream's "LPIPS")."""
    return (lpips_features(phi, x1) - lpips_features(phi, x2)).norm(dim=1)


def margin_loss(logits, y, kappa=KAPPA):
    """min(max_{i != y} z_i - z_y, kappa) (B,): Laidlaw et al.'s margin loss, capped at kappa."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return (z_other - z_y).clamp(max=kappa)


def _bdot(a, b):
    """Per-example inner product (B,)."""
    return (a * b).flatten(1).sum(1)


def _jvp_fd(phi, x, feats_x, v, h=FD_H):
    """J v by a forward finite difference along the unit direction of v (B, D)."""
    # DEVIATION: probe along v / ||v|| with step h, then rescale by ||v|| (upstream probes x + h v)
    nv = v.flatten(1).norm(dim=1)
    u = v / nv.clamp_min(1e-30).view(-1, 1, 1, 1)
    with torch.no_grad():
        return (lpips_features(phi, x + h * u) - feats_x) / h * nv[:, None]


def _solve_cg(jtj, g, iters):
    """Conjugate gradient for (J^T J) v = g per example, starting at v = 0; returns v."""
    v, r = torch.zeros_like(g), g.clone()
    p, rr = r.clone(), _bdot(r, r)
    active = torch.ones_like(rr, dtype=torch.bool)
    for it in range(iters):
        # DEVIATION: per-point stop (upstream stops when the largest residual of the batch is small)
        if it > 0:
            active &= rr >= CG_TOL
        if not active.any():
            break
        ap = jtj(p)
        pap = _bdot(p, ap)
        active &= pap > 0                                  # guard against a numerically indefinite product
        alpha = torch.where(active, rr / pap.clamp_min(1e-30), torch.zeros_like(rr)).view(-1, 1, 1, 1)
        v, r = v + alpha * p, r - alpha * ap
        rr_new = _bdot(r, r)
        p = r + (rr_new / rr.clamp_min(1e-30)).view(-1, 1, 1, 1) * p
        rr = torch.where(active, rr_new, rr)
    return v


def _first_order_step(model, phi, x_adv, y, step_b, dirn, loss_fn, kappa, cg_iters):
    """One PPGD step from x_adv: solve (J^T J) v = grad with CG, move by a perceptual length step_b (upstream)."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    losses = margin_loss(logits, y, kappa) if loss_fn is None else loss_fn(logits, y)
    (grad,) = torch.autograd.grad((dirn * losses).sum(), [x_adv])
    feats = lpips_features(phi, x_adv)                     # graph kept for the products J^T w
    feats_x, x0 = feats.detach(), x_adv.detach()

    def jtj(vec):                                          # (J^T J) vec: FD forward, then backward through phi
        (out,) = torch.autograd.grad(feats, [x_adv], grad_outputs=_jvp_fd(phi, x0, feats_x, vec), retain_graph=True)
        return out

    v = _solve_cg(jtj, grad, cg_iters)
    jv_norm = _jvp_fd(phi, x0, feats_x, v).norm(dim=1)
    lam = step_b.flatten() / jv_norm.clamp_min(1e-12)
    move = (grad.flatten(1).norm(dim=1) >= GRAD_TOL) & (jv_norm > 0)
    lam = torch.where(move, lam, torch.zeros_like(lam)).view(-1, 1, 1, 1)
    return (x0 + lam * v).clamp(0.0, 1.0).detach()


def _project(phi, x, feats_clean, x_adv, eps_v):
    """Project x_adv into {d(x, .) <= eps}: Newton steps with overshoot, then bisection on [x, x_adv] (upstream)."""
    x_out = x_adv.clone()
    todo = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(NEWTON_ITERS):
        idx = todo.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x_out
        xi = x_out[idx].detach().requires_grad_(True)
        dist = (lpips_features(phi, xi) - feats_clean[idx]).norm(dim=1)
        (gd,) = torch.autograd.grad(dist.sum(), [xi])
        outside = dist.detach() > eps_v[idx]
        size = ((dist.detach() - eps_v[idx]).clamp_min(0.0) + OVERSHOOT) * (1 + OVERSHOOT)
        inv_grad = gd / gd.flatten(1).pow(2).sum(1).clamp_min(1e-20).view(-1, 1, 1, 1)
        stepped = (xi.detach() - size.view(-1, 1, 1, 1) * inv_grad).clamp(0.0, 1.0)
        x_out[idx[outside]] = stepped[outside]
        todo[idx[~outside]] = False
    idx = todo.nonzero().squeeze(1)                        # verify the points stepped in the last iteration
    if idx.numel() > 0:
        with torch.no_grad():
            dist = (lpips_features(phi, x_out[idx]) - feats_clean[idx]).norm(dim=1)
        idx = idx[dist > eps_v[idx]]
    if idx.numel() > 0:                                    # bisection fallback on the unprojected step
        # DEVIATION: only the points Newton did not project (upstream re-bisects the whole batch)
        xs, delta = x[idx], x_adv[idx] - x[idx]
        lo = torch.zeros(idx.numel(), device=x.device, dtype=x.dtype)
        hi = torch.ones_like(lo)
        with torch.no_grad():
            for _ in range(BISECT_ITERS):
                mid = (lo + hi) / 2
                inside = (lpips_features(phi, xs + mid.view(-1, 1, 1, 1) * delta) - feats_clean[idx]).norm(dim=1) \
                    <= eps_v[idx]
                lo, hi = torch.where(inside, mid, lo), torch.where(inside, hi, mid)
        x_out[idx] = xs + lo.view(-1, 1, 1, 1) * delta
    return x_out


def ppgd(model, x, y, *, eps=0.5, steps=10, step_size=None, lpips_net="self", cg_iters=5, direction=1,
         loss_fn=None, kappa=KAPPA, generator=None):
    """Perceptual PGD (Laidlaw et al. 2021): maximise the capped margin loss s.t. LPIPS distance d(x, x_adv) <= eps.

    eps: bound on the square-rooted un-weighted LPIPS distance (float or (B,) tensor), default 0.5.
    steps: 10 = cheaper training setting (default); 40 = the paper's evaluation setting.
    step_size: perceptual length of each step, default 2 eps / steps. lpips_net: "self" or a feature network.
    Returns the last (projected) iterate, detached, in [0, 1].
    """
    check_inputs(x, y, eps)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(cg_iters, int) or cg_iters < 1:
        raise ValueError(f"cg_iters must be an int >= 1, got {cg_iters!r}")
    phi = feature_fn(model, lpips_net)
    eps_v = per_sample(eps, x).flatten()
    if not (eps_v > 0).any():
        return x.clone().detach()
    step_b = per_sample(2 * eps_v / max(steps, 1) if step_size is None else step_size, x)
    dirn = per_sample(direction, x).flatten()
    x = x.detach()
    with torch.no_grad():
        feats_clean = lpips_features(phi, x)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    # DEVIATION: the start is clipped to the image box (upstream: unclipped until the first step)
    x_adv = _project(phi, x, feats_clean, (x + START_STD * noise).clamp(0.0, 1.0), eps_v)
    for _ in range(steps):
        x_adv = _first_order_step(model, phi, x_adv, y, step_b, dirn, loss_fn, kappa, cg_iters)
        x_adv = _project(phi, x, feats_clean, x_adv, eps_v)
    x_adv = torch.where(eps_v.view(-1, 1, 1, 1) > 0, x_adv, x)   # eps = 0 -> exactly x
    return x_adv.clamp(0.0, 1.0).detach()
