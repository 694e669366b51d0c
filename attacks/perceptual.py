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
metric), ||J v||^2 = v . (g - r) from CG's own residual r (see the deviations). Points with ||g|| < 1e-4 (e.g. margin already >= kappa) are not moved.
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
Cost per iteration (B images): 1 forward+backward of the model, per CG iteration one phi forward (finite difference)
+ one backward through phi, and in the projection 1 phi forward+backward (Newton iteration 0)
and 1 phi forward with graph (the membership check; its features, graph included, are those of the next step's point,
so the step does not recompute them), plus 1 phi forward+backward per further Newton iteration (rare) and 10 phi
forwards for the bisection fallback (rarer) (see README for measured ratios).
Host syncs (GPU): every pass runs on the whole batch with masks, never on an indexed subset, so the only syncs are the
data-dependent loop exits, as upstream's: CG stops once no point of the batch goes on. The first read of a step asks
two things at once: whether any point is still outside after the projection's first Newton iteration, and whether CG
goes on after its first iteration. Each further CG iteration but the last adds one read (a CIFAR PGD-AT model needs
~3 iterations per step, a random one 1), a further Newton iteration one (rare). A read costs far less than the phi
forward+backward of a CG iteration it saves.

Deviations from the reference:
  - start noise std 1e-4 instead of upstream PerceptualPGDAttack's 0.01; see START_STD.
  - finite difference along the unit direction v / ||v|| (rescaled by ||v||) instead of along v itself -- keeps the
    probe at a fixed size h whatever the scale of v.  # DEVIATION tagged in _jvp_fd
  - the start is clipped to [0, 1] (upstream leaves it outside the box until the first step) -- the model only ever
    sees valid images.  # DEVIATION tagged in ppgd
  - ||J v|| for the step length from the CG identity ||J v||^2 = v . (J^T J v) = v . (g - r), r the CG residual,
    instead of a further finite-difference forward (upstream): same linearisation, one phi forward less per
    step (README: measured effect).  # DEVIATION tagged in _step_end
  - CG stops per point (residual^2 < 0.1) instead of when every point of the batch has converged, and the bisection
    fallback runs only on the points Newton did not project (upstream re-bisects the whole batch) -- per-point results
    do not depend on the rest of the batch.  # DEVIATION tagged in _cg_iteration and _project_end
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


def _cg_start(g):
    """CG state (v, r, p, rr, active) for (J^T J) v = g per example, at v = 0."""
    r = g.clone()
    return torch.zeros_like(g), r, r.clone(), _bdot(r, r), torch.ones(g.shape[0], dtype=torch.bool, device=g.device)


def _cg_iteration(jtj, state, it):
    """CG iteration `it` on the whole batch with masks: a point that has stopped gets alpha = 0 (v, r unchanged).

    So an iteration in which every point has stopped changes nothing, and the residual stays r = g - (J^T J) v.
    """
    v, r, p, rr, active = state
    # DEVIATION: per-point stop (upstream stops when the largest residual of the batch is small)
    if it > 0:
        active = active & (rr >= CG_TOL)
    ap = jtj(p)
    pap = _bdot(p, ap)
    active = active & (pap > 0)                            # guard against a numerically indefinite product
    alpha = torch.where(active, rr / pap.clamp_min(1e-30), torch.zeros_like(rr)).view(-1, 1, 1, 1)
    v, r = v + alpha * p, r - alpha * ap
    rr_new = _bdot(r, r)
    p = r + (rr_new / rr.clamp_min(1e-30)).view(-1, 1, 1, 1) * p
    return v, r, p, torch.where(active, rr_new, rr), active


def _cg_goes_on(state):
    """(B,) bool: the points that the next CG iteration would still update (squared residual >= CG_TOL)."""
    return state[4] & (state[3] >= CG_TOL)


def _step_begin(model, phi, leaf, feats, y, dirn, loss_fn, kappa):
    """First half of a PPGD step at `leaf` (a leaf requiring grad; feats: its phi features with their graph, or None):
    the objective's gradient and the first CG iteration, no host sync. Returns (context, CG state) for _step_end."""
    logits = model(leaf)
    losses = margin_loss(logits, y, kappa) if loss_fn is None else loss_fn(logits, y)
    (grad,) = torch.autograd.grad((dirn * losses).sum(), [leaf])
    if feats is None:
        feats = lpips_features(phi, leaf)                  # graph kept for the products J^T w
    feats_x, x0 = feats.detach(), leaf.detach()

    def jtj(vec):                                          # (J^T J) vec: FD forward, then backward through phi
        (out,) = torch.autograd.grad(feats, [leaf], grad_outputs=_jvp_fd(phi, x0, feats_x, vec), retain_graph=True)
        return out

    return (jtj, grad, x0), _cg_iteration(jtj, _cg_start(grad), 0)


def _step_end(context, state, cg_iters, goes_on, step_b):
    """Second half of a PPGD step (upstream): further CG iterations while some point goes on (`goes_on`: after the
    first), then x_{k+1} = clip(x_k + lam v, 0, 1) with lam = step_b / ||J v||; points with ||grad|| < GRAD_TOL stay."""
    jtj, grad, x0 = context
    for it in range(1, cg_iters):
        if not goes_on:
            break                                          # every point has stopped: the rest would change nothing
        state = _cg_iteration(jtj, state, it)
        goes_on = it + 1 < cg_iters and bool(_cg_goes_on(state).any())   # host sync (none after the last)
    v, r = state[0], state[1]
    # DEVIATION: ||J v||^2 = v . (J^T J v) = v . (g - r) (CG keeps r = g - J^T J v), not a further FD forward of phi
    jv_norm = _bdot(v, grad - r).clamp_min(0.0).sqrt()
    lam = step_b.flatten() / jv_norm.clamp_min(1e-12)
    move = (grad.flatten(1).norm(dim=1) >= GRAD_TOL) & (jv_norm > 0)
    lam = torch.where(move, lam, torch.zeros_like(lam)).view(-1, 1, 1, 1)
    return (x0 + lam * v).clamp(0.0, 1.0).detach()


def _check(phi, feats_clean, eps_v, state):
    """A membership check of the projection: phi features (with graph) of the current point, its distance, and the
    points still outside among those stepped last (state["todo"]). Whole batch, no host sync."""
    xi = state["x_out"].detach().requires_grad_(True)
    feats = lpips_features(phi, xi)
    dist = (feats - feats_clean).norm(dim=1)
    state.update(xi=xi, feats=feats, dist=dist, outside=state["todo"] & (dist.detach() > eps_v))


def _newton_step(eps_v, state):
    """One Newton step with overshoot on the points found outside by the last check (the others keep their point)."""
    xi, dist, outside = state["xi"], state["dist"], state["outside"]
    (gd,) = torch.autograd.grad(dist.sum(), [xi])
    size = ((dist.detach() - eps_v).clamp_min(0.0) + OVERSHOOT) * (1 + OVERSHOOT)
    inv_grad = gd / gd.flatten(1).pow(2).sum(1).clamp_min(1e-20).view(-1, 1, 1, 1)
    stepped = (xi.detach() - size.view(-1, 1, 1, 1) * inv_grad).clamp(0.0, 1.0)
    state.update(x_out=torch.where(outside.view(-1, 1, 1, 1), stepped, state["x_out"]), todo=outside,
                 newton=state["newton"] + 1)


def _project_begin(phi, x, feats_clean, x_adv, eps_v):
    """The projection up to its first host sync: check 0, Newton iteration 0 (if NEWTON_ITERS >= 1) and the forward
    of check 1. Returns the state for _project_end, whose state["outside"].any() is the pending question.

    Checks j = 0 .. NEWTON_ITERS look at the current point of the points stepped since the last check (all at j = 0);
    after check j < NEWTON_ITERS the points outside take a Newton step, after the last one they are bisected. The
    projection ends at the first check j >= 1 with no point outside. Every pass runs on the whole batch with masks: a
    point changes only while it is outside and is frozen once a check finds it inside, exactly as if the points still
    outside were run alone (per-point results do not depend on the rest of the batch, given a feature network that
    treats points independently, e.g. in eval mode).
    """
    state = {"x_adv": x_adv, "x_out": x_adv.detach(), "newton": 0,
             "todo": torch.ones(x.shape[0], dtype=torch.bool, device=x.device)}
    _check(phi, feats_clean, eps_v, state)
    if NEWTON_ITERS >= 1:      # check 0 asks nothing: after a step some point is usually outside
        _newton_step(eps_v, state)
        _check(phi, feats_clean, eps_v, state)
    return state


def _project_end(phi, x, feats_clean, eps_v, state, any_outside):
    """The rest of the projection, given any_outside = state["outside"].any() read by the caller. Returns
    (x_out, cached): cached = (leaf, features with graph) of x_out when the last check computed them, else None.

    Each further check (a second Newton iteration: rare, the overshoot usually lands a point well inside) costs one
    host sync; the bisection fallback (rarer) none.
    """
    while any_outside:
        if state["newton"] >= NEWTON_ITERS:               # bisection fallback on the unprojected step
            # DEVIATION: only the points Newton did not project (upstream re-bisects the whole batch)
            delta = state["x_adv"] - x
            lo = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
            hi = torch.ones_like(lo)
            with torch.no_grad():
                for _ in range(BISECT_ITERS):
                    mid = (lo + hi) / 2
                    inside = (lpips_features(phi, x + mid.view(-1, 1, 1, 1) * delta) - feats_clean).norm(dim=1) \
                        <= eps_v
                    lo, hi = torch.where(inside, mid, lo), torch.where(inside, hi, mid)
            return torch.where(state["outside"].view(-1, 1, 1, 1), x + lo.view(-1, 1, 1, 1) * delta,
                               state["x_out"]), None
        _newton_step(eps_v, state)
        _check(phi, feats_clean, eps_v, state)
        any_outside = bool(state["outside"].any())
    return state["x_out"], (state["xi"], state["feats"])


def _project(phi, x, feats_clean, x_adv, eps_v):
    """Project x_adv into {d(x, .) <= eps}: Newton steps with overshoot, then bisection on [x, x_adv] (upstream)."""
    state = _project_begin(phi, x, feats_clean, x_adv, eps_v)
    return _project_end(phi, x, feats_clean, eps_v, state, bool(state["outside"].any()))[0]


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
    proj = _project_begin(phi, x, feats_clean, (x + START_STD * noise).clamp(0.0, 1.0), eps_v)
    for _ in range(steps):
        # Speculatively start the step at the point of the pending projection check (its features, with their graph,
        # are already computed), then read both pending questions at once -- "is any point still outside?" (the
        # projection's exit) and "does CG go on for any point after its first iteration?" (CG's exit) -- in ONE host
        # sync. Both answers decide whether to launch more phi passes of the whole batch; without them every step
        # would run all cg_iters CG iterations (a trained model's batch needs ~3), all NEWTON_ITERS Newton iterations
        # and the bisection. If the projection is not done (rare), the speculative start is dropped and redone at the
        # projected point (a few more syncs, in _project_end).
        context, cg = _step_begin(model, phi, proj["xi"], proj["feats"], y, dirn, loss_fn, kappa)
        any_outside, goes_on = torch.stack([proj["outside"].any(), _cg_goes_on(cg).any()]).tolist()
        if any_outside:
            x_adv, cached = _project_end(phi, x, feats_clean, eps_v, proj, True)
            context, cg = _step_begin(model, phi, *(cached or (x_adv.detach().requires_grad_(True), None)), y, dirn,
                                      loss_fn, kappa)
            del cached
            goes_on = bool(_cg_goes_on(cg).any())
        x_next = _step_end(context, cg, cg_iters, goes_on, step_b)
        del context, cg, proj                              # free this step's phi graph before the projection
        proj = _project_begin(phi, x, feats_clean, x_next, eps_v)
    x_adv, _ = _project_end(phi, x, feats_clean, eps_v, proj, bool(proj["outside"].any()))
    x_adv = torch.where(eps_v.view(-1, 1, 1, 1) > 0, x_adv, x)   # eps = 0 -> exactly x
    return x_adv.clamp(0.0, 1.0).detach()
