"""APGD (Croce & Hein, ICML 2020) with CE / DLR / targeted-DLR losses for l_inf, l_2 and l_1: AutoAttack's core.

Private module of attacks/autoattack.py (reference: autoattack/autopgd_base.py of
https://github.com/fra31/auto-attack).

One run (`apgd_run`) from a starting point x0 inside the ball:
  l_inf / l_2:  z = P(x_k + eta * s(g)),  x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))
                with s(g) = sign(g) (l_inf) or g / ||g||_2 (l_2), momentum a = 0.75 (1.0 on the first step),
                initial step eta = 2 eps, and step halving at checkpoints (first after 22% of the iterations, the
                interval shrinks by 3% down to 6%): halve where the loss increased in <= rho * interval of the
                steps since the last checkpoint (rho = 0.75), or where the step was not halved last time and the
                best loss did not improve; halved points restart from their best point and gradient.
  l_1 ("Mind the box"): sparse step (top-k |g| coordinates, total l_1 length eta), no momentum, projection
                onto the l_1 ball intersected with the [0,1] box; every max(int(0.04 N), 1) iterations the sparsity
                becomes ||x_best - x||_0 / (1.5 d) and eta is reset to eps (restart from x_best) if ||.||_0 dropped
                by more than 5%, else eta /= 1.5, clamped to [eps/10, eps]; initial sparsity 0.2, eta = eps.
`apgd` adds random starts, restarts, targets (APGD-T: the k-th most likely clean classes, k = 2..n_target+1)
and, for l_1, the large-eps schedule 3eps -> 2eps -> eps over 30/30/40% of the iterations (each stage starts
from the previous stage's best point re-projected; only the last stage, at eps, may count a point as broken).
The todo / target / restart / hit bookkeeping is `run_attempts`, shared with FAB-T (_fab.py).
A point is broken when some iterate is misclassified; that iterate is returned (AutoAttack never returns a
best-loss-but-correct point).

Randomness: every random draw has the shape of the FULL batch and is then indexed by the points being attacked,
so a point's result does not depend on which other points are still robust (the runner's sequential logic then
equals the point-wise AND over components run independently).

Deviations from the reference:
  - the first oscillation check compares against the loss at the starting point (AutoAttack reads an unset
    entry of its loss history there).  # DEVIATION tagged in _halve_steps
Depends on: attacks/_common.py
"""

import math

import torch
import torch.nn.functional as F

from attacks._common import kth_smallest, per_sample, project_l1_box, project_l2, project_linf

NORMS = ("linf", "l2", "l1")
LOSSES = ("ce", "dlr", "dlr-t")

RHO = 0.75                 # oscillation threshold (AutoAttack rho)
MOMENTUM = 0.75            # a in x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))
CHECK_FIRST, CHECK_DECR, CHECK_MIN = 0.22, 0.03, 0.06   # checkpoint schedule as fractions of n_iter
L1_SPARSITY_EVAL = 0.2     # initial fraction of coordinates moved per l_1 step (evaluation setting)
L1_CHECK_EVERY = 0.04      # l_1 adaptation every max(int(0.04 n_iter), 1) iterations
L1_SHRINK = 1.5            # sparsity = ||.||_0 / (1.5 d); step /= 1.5
L1_RESTART_RATIO = 0.95    # ||.||_0 dropped by more than 5% -> reset step and restart from x_best
L1_MIN_STEP_FRAC = 10.0    # l_1 step clamped to [eps / 10, eps]
LARGE_EPS = ((3.0, 0.3), (2.0, 0.3), (1.0, None))   # (eps multiple, fraction of n_iter); last stage: the rest
DLR_EPS = 1e-12


def ce_loss(logits, y, target=None):
    """Per-example cross-entropy (B,)."""
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits, y, target=None):
    """Untargeted DLR: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), pi = logits sorted descending (>= 3 classes)."""
    if logits.shape[1] < 3:
        raise ValueError(f"DLR loss needs >= 3 classes, got {logits.shape[1]}")
    z_sorted = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = torch.where(logits.argmax(1) == y, z_sorted[:, 1], z_sorted[:, 0])   # best wrong class
    return -(z_y - z_other) / (z_sorted[:, 0] - z_sorted[:, 2] + DLR_EPS)


def dlr_targeted_loss(logits, y, target):
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) (needs >= 4 classes)."""
    if logits.shape[1] < 4:
        raise ValueError(f"targeted DLR loss needs >= 4 classes, got {logits.shape[1]}")
    z_sorted = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z_sorted[:, 0] - 0.5 * (z_sorted[:, 2] + z_sorted[:, 3]) + DLR_EPS)


LOSS_FNS = {"ce": ce_loss, "dlr": dlr_loss, "dlr-t": dlr_targeted_loss}


def project(x, x_adv, eps_b, norm):
    """Project x_adv onto {||x_adv - x||_norm <= eps} intersected with the [0,1] box (exact for l_1; AA order else)."""
    if norm == "linf":
        return (x + project_linf(x_adv - x, eps_b)).clamp(0.0, 1.0)
    if norm == "l2":
        return (x + project_l2(x_adv - x, eps_b)).clamp(0.0, 1.0)
    return x + project_l1_box(x, x_adv - x, eps_b)


def random_start(x, eps, norm, noise):
    """AutoAttack's random start from the given noise: l_inf eps t/||t||_inf (t uniform), l_2 eps t/||t||_2
    (t Gaussian), l_1 the l_1-ball-and-box projection of the Gaussian t."""
    b, eps_b = x.shape[0], per_sample(eps, x)
    if norm == "linf":
        t = 2 * noise - 1
        return (x + eps_b * t / t.flatten(1).abs().amax(1).view(b, 1, 1, 1)).clamp(0.0, 1.0)
    if norm == "l2":
        return (x + eps_b * noise / noise.flatten(1).norm(dim=1).view(b, 1, 1, 1)).clamp(0.0, 1.0)
    return x + project_l1_box(x, noise, eps_b)


def _value_and_grad(model, x_adv, y, loss_fn, target):
    """Logits, per-example loss (B,) and its input gradient at x_adv (no parameter .grad is written)."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    losses = loss_fn(logits, y, target)
    (grad,) = torch.autograd.grad(losses.sum(), [x_adv])
    return logits.detach(), losses.detach(), grad.detach()


def _sparse_step(grad, frac):
    """l_1 step direction: sign(g) on the top-k |g| coordinates (k = frac * d), scaled to total l_1 length 1."""
    b, d = grad.shape[0], grad[0].numel()
    g_abs = grad.abs().flatten(1)
    kth = ((1.0 - frac) * d).clamp(0, d - 1).long()                # index of the threshold in ascending order
    thresh = kth_smallest(g_abs, kth + 1)                          # (B, 1), no sort
    direction = (grad.sign().flatten(1) * (g_abs >= thresh)).view_as(grad)
    return direction / (direction.flatten(1).abs().sum(1).view(b, 1, 1, 1) + 1e-10)


def apgd_run(model, x, y, x0, *, eps, norm, n_iter, loss="ce", target=None):
    """One APGD run from x0 (the module docstring). Returns (x_best, broken (B,), x_broken): best-loss point, whether
    some iterate was misclassified, and the last misclassified iterate (= x0 where none was)."""
    b, d = x.shape[0], x[0].numel()
    loss_fn = LOSS_FNS[loss]
    eps_b = per_sample(eps, x)
    step = (2.0 if norm in ("linf", "l2") else 1.0) * eps_b        # eta_0 = 2 eps (l_inf, l_2), eps (l_1)
    x_adv = x0.clone()
    logits, cur_loss, grad = _value_and_grad(model, x_adv, y, loss_fn, target)
    broken = logits.argmax(1) != y
    x_broken = x_adv.clone()
    loss_best, x_best, grad_best = cur_loss.clone(), x_adv.clone(), grad.clone()
    history = [cur_loss]                                            # loss at the start and after every step
    x_prev = x_adv.clone()

    interval = max(int(CHECK_FIRST * n_iter), 1)
    interval_decr, interval_min = max(int(CHECK_DECR * n_iter), 1), max(int(CHECK_MIN * n_iter), 1)
    loss_best_last = loss_best.clone()
    halved_last = torch.ones(b, dtype=torch.bool, device=x.device)
    l1_every = max(int(L1_CHECK_EVERY * n_iter), 1)
    frac = torch.full((b,), L1_SPARSITY_EVAL, device=x.device, dtype=x.dtype)
    nnz_old = torch.full((b,), float(d), device=x.device, dtype=x.dtype)
    since_check = 0

    for i in range(n_iter):
        if norm == "l1":                                            # l_1: sparse step, no momentum
            x_adv = project(x, x_adv + step * _sparse_step(grad, frac), eps_b, norm)
        else:                                                       # step + momentum, projected twice
            a = MOMENTUM if i > 0 else 1.0
            if norm == "linf":
                s = grad.sign()
            else:
                s = grad / (grad.flatten(1).norm(dim=1).view(b, 1, 1, 1) + 1e-12)
            z = project(x, x_adv + step * s, eps_b, norm)
            x_new = project(x, x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), eps_b, norm)
            x_prev, x_adv = x_adv, x_new

        logits, cur_loss, grad = _value_and_grad(model, x_adv, y, loss_fn, target)
        # masks (torch.where), not boolean indexing: no host sync per iteration
        mis = logits.argmax(1) != y
        x_broken = torch.where(mis.view(b, 1, 1, 1), x_adv, x_broken)
        broken |= mis
        history.append(cur_loss)
        better = cur_loss > loss_best
        bb = better.view(b, 1, 1, 1)
        x_best, grad_best = torch.where(bb, x_adv, x_best), torch.where(bb, grad, grad_best)
        loss_best = torch.where(better, cur_loss, loss_best)
        since_check += 1

        if norm == "l1" and since_check == l1_every:                # l_1: adaptive sparsity and step size
            nnz = ((x_best - x).flatten(1) != 0).sum(1).to(x.dtype)
            restart = nnz / nnz_old < L1_RESTART_RATIO
            frac = nnz / d / L1_SHRINK
            step = torch.where(restart.view(b, 1, 1, 1), eps_b, step / L1_SHRINK)
            step = torch.maximum(torch.minimum(step, eps_b), eps_b / L1_MIN_STEP_FRAC)
            nnz_old = nnz
            rb = restart.view(b, 1, 1, 1)
            x_adv, grad = torch.where(rb, x_best, x_adv), torch.where(rb, grad_best, grad)
            since_check = 0
        elif norm != "l1" and since_check == interval:             # checkpoint step halving
            recent = torch.stack(history[-interval - 1:])           # (interval + 1, B)
            # DEVIATION: the first checkpoint also counts the first step's increase over the starting loss --
            # AutoAttack compares it with an unset history entry; the intent ("loss increased") is kept.
            n_increase = (recent[1:] > recent[:-1]).sum(0)
            oscillating = n_increase <= RHO * interval
            stalled = ~halved_last & (loss_best_last >= loss_best)
            halve = oscillating | stalled
            halved_last, loss_best_last = halve, loss_best.clone()
            step = torch.where(halve.view(b, 1, 1, 1), step / 2, step)
            hb = halve.view(b, 1, 1, 1)
            x_adv, grad = torch.where(hb, x_best, x_adv), torch.where(hb, grad_best, grad)
            since_check = 0
            interval = max(interval - interval_decr, interval_min)
    return x_best, broken, x_broken


def run_attempts(model, x, todo, attempt, *, n_target=None, n_restarts=1, min_classes=0, name="this attack"):
    """The bookkeeping shared by the components (APGD, FAB-T) on the points in `todo` (B,) bool.

    For each target (n_target None: untargeted, one pass with target None; else AutoAttack's targets, the k-th most
    likely clean class, k = 2..min(n_target, C - 1) + 1) and each of n_restarts: attempt(idx, target[idx]) ->
    (hit, x_hit) runs on the still-unbroken points idx only. Returns (x_adv, broken): broken (B,) marks the points
    some attempt hit, x_adv holds that attempt's x_hit there and x elsewhere. The clean logits of the todo points
    (one forward pass) give the number of classes C (ValueError below min_classes) and the targets.
    """
    b = x.shape[0]
    x_adv, broken = x.clone(), torch.zeros(b, dtype=torch.bool, device=x.device)
    todo_idx = todo.nonzero().squeeze(1)
    if todo_idx.numel() == 0:
        return x_adv, broken
    with torch.no_grad():   # clean logits of the attacked points only (-> targets)
        logits_todo = model(x[todo_idx])
    n_classes = logits_todo.shape[1]
    if n_classes < min_classes:
        raise ValueError(f"{name} needs >= {min_classes} classes, the model has {n_classes}")
    targets = [None]
    if n_target is not None:
        logits = torch.zeros(b, n_classes, device=x.device, dtype=x.dtype)
        logits[todo_idx] = logits_todo
        order = logits.argsort(dim=1, descending=True)              # clean logits, most likely first
        targets = [order[:, k - 1] for k in range(2, min(n_target, n_classes - 1) + 2)]
    for target in targets:
        for _ in range(n_restarts):
            # the one host sync of an attempt: which points are still to attack (a data-dependent sub-batch)
            idx = (todo & ~broken).nonzero().squeeze(1)
            if idx.numel() == 0:
                return x_adv, broken
            hit, x_hit = attempt(idx, None if target is None else target[idx])
            x_adv[idx] = torch.where(hit.view(-1, *([1] * (x.dim() - 1))), x_hit, x_adv[idx])   # no boolean index
            broken[idx] = broken[idx] | hit
    return x_adv, broken


def apgd(model, x, y, todo, *, norm, eps, loss="ce", n_iter=100, n_restarts=1, n_target=0, large_eps=False,
         generator=None):
    """APGD-CE / APGD-DLR (n_target = 0) or APGD-T (n_target > 0, loss 'dlr-t') on the points in `todo` (B,) bool.

    Returns (x_adv, broken): broken (B,) marks points for which a misclassified iterate inside the eps-ball was
    found; x_adv holds that iterate there and x elsewhere. Restarts and targets run only on still-unbroken points.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")
    if large_eps and norm != "l1":
        raise ValueError(f"the large-eps schedule is for l1 only, got norm {norm!r}")
    if n_target > 0 and loss != "dlr-t":
        raise ValueError(f"targeted APGD uses loss 'dlr-t', got {loss!r}")
    if large_eps:
        iters = [math.ceil(f * n_iter) for _, f in LARGE_EPS[:-1]]
        stages = [(m * eps, it) for (m, _), it in zip(LARGE_EPS, iters + [max(n_iter - sum(iters), 1)])]
    else:
        stages = [(eps, n_iter)]

    def attempt(idx, target):
        # draw for the full batch, then select (keeps every point's draw independent of the others)
        noise = (torch.rand if norm == "linf" else torch.randn)(x.shape, generator=generator, device=x.device,
                                                                dtype=x.dtype)
        xs, ys = x[idx], y[idx]
        x0 = random_start(xs, stages[0][0], norm, noise[idx])
        for eps_s, iters_s in stages:   # one stage unless the l_1 large-eps schedule is on
            x0 = project(xs, x0, per_sample(eps_s, xs), norm)
            x0, hit, x_hit = apgd_run(model, xs, ys, x0, eps=eps_s, norm=norm, n_iter=iters_s, loss=loss,
                                      target=target)
        return hit, x_hit

    return run_attempts(model, x, todo, attempt, n_target=n_target if n_target > 0 else None, n_restarts=n_restarts,
                        min_classes={"ce": 2, "dlr": 3, "dlr-t": 4}[loss], name=f"APGD with loss {loss!r}")
