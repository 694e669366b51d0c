"""l_p attacks: linf and l2 (PGD, Madry et al. 2018) and l1 (APGD-l1, Croce & Hein 2021, "Mind the box").

Depends on: attacks/_common.py

All three take eps as a float or a per-sample (B,) tensor, `direction` +1 (adversary: maximise the loss) or -1
(anti-adversary: minimise it; a (B,) tensor of signs is allowed, as CAAT needs), and `loss='ce'|'kl'`:
'kl' is TRADES' boundary loss KL(f(x) || f(x_adv)) against the clean output (CAAT Alg. 1, line 8).
Defaults are the CIFAR-10 budgets of E-AT: eps_inf = 8/255, eps_2 = 0.5, eps_1 = 12 (CAS Section 5.1).

- linf / l2 return the LAST PGD iterate (Madry's PGD), step rule sign(g) / g/||g||_2,
  default step size 2.5 * eps / steps (Madry et al.'s rule; also cas.py's training-time attack strength,
  README.md, cas.py "Implementation details" item 8).
- l1 returns the iterate with the best objective (APGD returns its best point); sparse top-k step with
  adaptive sparsity and the exact projection onto the l1 ball intersected with the [0,1] box.
"""

import torch
import torch.nn.functional as F

from attacks._common import (ce_losses, check_inputs, kth_smallest, lp_norm, per_sample, project_l1_box,
                             project_l2, project_linf)

INITS = ("uniform", "trades", "zero")
LOSSES = ("ce", "kl")

# TRADES initialises the attack at x + 0.001 * N(0, I) (Zhang et al. 2019; CAAT Alg. 1, line 5)
TRADES_INIT_STD = 1e-3


def _objective_fn(model, x, y, loss, loss_fn):
    """Per-example loss l(x_adv) -> (B,): CE against y, or TRADES' KL(f(x) || f(x_adv))."""
    if loss_fn is not None:
        return lambda x_adv: loss_fn(model(x_adv), y)
    if loss == "ce":
        return lambda x_adv: ce_losses(model(x_adv), y)
    if loss == "kl":
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        return lambda x_adv: F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="none").sum(1)
    raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")


def _init_delta(x, eps_b, init, p, generator):
    """Starting perturbation inside the eps-ball (and the box)."""
    if init == "zero":
        return torch.zeros_like(x)
    if init == "trades":
        return TRADES_INIT_STD * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if init == "uniform":
        if p == "inf":   # uniform in the l_inf ball
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return (2 * u - 1) * eps_b
        # l_2 / l_1: a random Gaussian direction scaled to a radius drawn uniformly in [0, eps]
        g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
        norm = lp_norm(g, 2 if p == "2" else 1).view_as(r)
        return g / (norm + 1e-12) * r * eps_b
    raise ValueError(f"unknown init {init!r}; choose from {INITS}")


def _pgd(model, x, y, *, p, eps, steps, step_size, init, direction, loss, loss_fn, generator):
    """Shared PGD loop for l_inf (sign step) and l_2 (normalised step); returns the last iterate."""
    check_inputs(x, y, eps)
    eps_b = per_sample(eps, x)
    step_b = per_sample(2.5 * eps_b.flatten() / max(steps, 1) if step_size is None else step_size, x)
    dirn = per_sample(direction, x).flatten()
    objective = _objective_fn(model, x, y, loss, loss_fn)
    project = project_linf if p == "inf" else project_l2

    delta = project(_init_delta(x, eps_b, init, p, generator), eps_b)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad((dirn * objective(x + delta)).sum(), [delta])
        if p == "inf":
            step = grad.sign()
        else:
            step = grad / (grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)
        delta = project(delta.detach() + step_b * step, eps_b)
        delta = (x + delta).clamp(0, 1) - x   # stay in the image box
    return (x + delta).clamp(0, 1).detach()


def linf(model, x, y, *, eps=8 / 255, steps=10, step_size=None, init="uniform", direction=1, loss="ce",
         loss_fn=None, generator=None):
    """l_inf PGD (Madry et al. 2018): delta <- clip_[-eps,eps](delta + step * direction * sign(grad)).

    eps, step_size, direction: float or (B,) tensor. step_size defaults to 2.5 * eps / steps.
    init: 'uniform' (Madry), 'trades' (x + 0.001 N(0, I)) or 'zero'. Returns the last iterate.
    """
    return _pgd(model, x, y, p="inf", eps=eps, steps=steps, step_size=step_size, init=init, direction=direction,
                loss=loss, loss_fn=loss_fn, generator=generator)


def l2(model, x, y, *, eps=0.5, steps=10, step_size=None, init="uniform", direction=1, loss="ce", loss_fn=None,
       generator=None):
    """l_2 PGD: delta <- P_{||.||_2 <= eps}(delta + step * direction * grad / ||grad||_2), then the [0,1] box.

    eps, step_size, direction: float or (B,) tensor. step_size defaults to 2.5 * eps / steps.
    init: 'uniform' (random direction, radius ~ U[0, eps]), 'trades' or 'zero'. Returns the last iterate.
    """
    return _pgd(model, x, y, p="2", eps=eps, steps=steps, step_size=step_size, init=init, direction=direction,
                loss=loss, loss_fn=loss_fn, generator=generator)


# APGD-l1 constants (Croce & Hein 2021; as in AutoAttack / E-AT's apgd_train)
L1_SPARSITY_TRAIN = 0.05   # initial fraction of coordinates moved per step in E-AT training (0.2 for evaluation)
L1_CHECK_EVERY = 0.04      # adapt sparsity and step every max(int(0.04 * steps), 1) iterations
L1_SPARSITY_SHRINK = 1.5   # new sparsity = ||x_best - x||_0 / (d * 1.5); step /= 1.5 when sparsity did not drop
L1_RESTART_RATIO = 0.95    # ||.||_0 dropped by more than 5% -> reset the step and restart from the best point
L1_MIN_STEP_FRAC = 10.0    # step clamped to [eps / 10, eps]


def l1(model, x, y, *, eps=12.0, steps=10, step_size=None, init="zero", direction=1, loss="ce", loss_fn=None,
       sparsity=L1_SPARSITY_TRAIN, generator=None):
    """APGD-l1 (Croce & Hein 2021): sparse top-k sign step, adaptive sparsity, exact l1-ball-and-box projection.

    Each step moves the k = ceil(s * d) coordinates with the largest |grad| by step/k each in the direction of
    direction * sign(grad) (total l_1 length `step`), then projects onto {||delta||_1 <= eps, x + delta in [0,1]}.
    Every max(int(0.04 * steps), 1) iterations: s <- ||x_best - x||_0 / (1.5 d); if ||x_best - x||_0 dropped by
    more than 5% the step is reset to eps and the iterate restarts from x_best, else step /= 1.5
    (clamped to [eps/10, eps]). No momentum. step_size = initial step (default eps).
    init 'zero' starts from x (E-AT's training attack); 'uniform' from a random point; 'trades' from 0.001 N(0, I).
    Returns the iterate with the best direction * loss seen (APGD's x_best).
    """
    check_inputs(x, y, eps)
    if not 0 < sparsity <= 1:
        raise ValueError(f"sparsity must be in (0, 1], got {sparsity!r}")
    b, d = x.shape[0], x[0].numel()
    eps_b = per_sample(eps, x)
    step_max = eps_b.clone() if step_size is None else per_sample(step_size, x)
    dirn = per_sample(direction, x).flatten()
    objective = _objective_fn(model, x, y, loss, loss_fn)

    def value_and_grad(delta):
        delta = delta.detach().requires_grad_(True)
        obj = dirn * objective(x + delta)                       # (B,), to be maximised
        (grad,) = torch.autograd.grad(obj.sum(), [delta])
        return obj.detach(), grad

    delta = project_l1_box(x, _init_delta(x, eps_b, init, "1", generator), eps_b)
    step = step_max.clone()
    frac = torch.full((b,), float(sparsity), device=x.device, dtype=x.dtype)
    obj, grad = value_and_grad(delta)
    best_obj, best_delta, best_grad = obj.clone(), delta.clone(), grad.clone()
    check_every = max(int(L1_CHECK_EVERY * steps), 1)
    nnz_old = torch.full((b,), float(d), device=x.device, dtype=x.dtype)

    for i in range(steps):
        # sparse step: move the top-k |grad| coordinates, k = ceil(frac * d), each by step / k
        k = torch.clamp(torch.ceil(frac * d), 1, d).long()
        g_abs = grad.abs().flatten(1)
        thresh = kth_smallest(g_abs, d - k + 1)                        # k-th largest |g| per example (no sort)
        mask = (g_abs >= thresh).view_as(grad).to(x.dtype)
        n_moved = mask.flatten(1).sum(1).view(-1, 1, 1, 1).clamp_min(1)
        delta = project_l1_box(x, delta + step * grad.sign() * mask / n_moved, eps_b)
        obj, grad = value_and_grad(delta)
        improved = obj > best_obj
        best_obj = torch.where(improved, obj, best_obj)
        better = improved.view(-1, 1, 1, 1)                             # masks, not boolean indexing: no sync
        best_delta, best_grad = torch.where(better, delta, best_delta), torch.where(better, grad, best_grad)

        if (i + 1) % check_every == 0:   # adaptive sparsity and step size
            nnz = (best_delta.flatten(1).abs() > 1e-10).sum(1).to(x.dtype)
            restart = nnz / nnz_old.clamp_min(1) < L1_RESTART_RATIO
            frac = (nnz / (d * L1_SPARSITY_SHRINK)).clamp(1.0 / d, 1.0)
            r = restart.view(-1, 1, 1, 1)
            step = torch.where(r, step_max, step / L1_SPARSITY_SHRINK)
            step = torch.maximum(torch.minimum(step, step_max), step_max / L1_MIN_STEP_FRAC)
            delta = torch.where(r, best_delta, delta)
            grad = torch.where(r, best_grad, grad)
            nnz_old = nnz
    return (x + best_delta).clamp(0, 1).detach()
