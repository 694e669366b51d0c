"""FAB-T: targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020) for l_inf, l_2, l_1, as AutoAttack runs it.

Private module of attacks/autoattack.py (reference: autoattack/fab_base.py and fab_pt.py of
https://github.com/fra31/auto-attack; constants are AutoAttack's FAB defaults: 100 iterations, alpha_max 0.1,
eta 1.05, beta 0.9, 9 target classes, 1 restart).

FAB looks for a MINIMAL adversarial perturbation; AutoAttack counts a point as broken when the perturbation found
is within eps. For target t (the k-th most likely clean class, k = 2..n_target+1), at the current iterate x_k:
  1. linearise g(z) = z_t - z_y: the decision hyperplane is {z : w.z = b}, w = grad g(x_k), b = w.x_k - g(x_k);
  2. d_1, d_2 = the minimal-||.||_p displacements that move x_k and the ORIGINAL x onto that hyperplane while
     staying in the box [0,1]^d (when the hyperplane cannot be reached inside the box: the farthest box point);
  3. biased step: alpha = min(||d_1|| / (||d_1|| + ||d_2||), alpha_max),
     x_{k+1} = clip((1 - alpha)(x_k + eta d_1) + alpha (x + eta d_2), 0, 1);
  4. if x_{k+1} is misclassified: keep it if it is the closest adversarial point so far, then move it back
     towards x: x_{k+1} <- x + beta (x_{k+1} - x).
With one restart AutoAttack's FAB-T starts at x itself (no random start), so the attack is deterministic.

The box-constrained hyperplane projections are exact:
  l_inf: d_i = s_i min(t, r_i) with the smallest t >= 0 such that sum |w_i| min(t, r_i) = c;
  l_2:   d_i = s_i min(lam |w_i|, r_i) (KKT), sum |w_i| min(lam |w_i|, r_i) = c;
  l_1:   fill coordinates in order of decreasing |w_i| up to their room r_i until w.d = c (fractional knapsack);
where c = b - w.p (signs flipped so that c >= 0), s_i = sign(w_i) and r_i = the room in [0,1] along s_i.
The first two are both "sum_i a_i min(s, beta_i) = c", solved exactly by sorting the breakpoints beta_i.

Deviations from the reference: none in the algorithm; the projections are our own exact solvers (sort + cumsum).
Depends on: attacks/_apgd.py (run_attempts: the todo / target / hit bookkeeping shared with APGD).
"""

import torch

from attacks._apgd import run_attempts

ALPHA_MAX, ETA, BETA = 0.1, 1.05, 0.9   # AutoAttack FAB defaults


def _solve_capped(a, beta, c):
    """Smallest s >= 0 with sum_i a_i min(s, beta_i) = c per row (a, beta >= 0; c >= 0).

    Where c is unreachable, returns the largest finite float (then min(s * ., room) = room: the farthest box move).
    """
    beta_sorted, order = beta.sort(dim=1)
    a_sorted = a.gather(1, order)
    below = torch.cumsum(a_sorted * beta_sorted, 1) - a_sorted * beta_sorted   # sum_{j<k} a_j beta_j
    suffix = a_sorted.flip(1).cumsum(1).flip(1)                               # sum_{j>=k} a_j
    value_at = below + beta_sorted * suffix                                    # G(beta_(k)), non-decreasing
    k = (value_at < c[:, None]).sum(1, keepdim=True)                           # first breakpoint with G >= c
    reachable = k.squeeze(1) < beta.shape[1]
    k = k.clamp(max=beta.shape[1] - 1)
    s = (c[:, None] - below.gather(1, k)) / suffix.gather(1, k).clamp_min(1e-30)
    return torch.where(reachable, s.squeeze(1).clamp_min(0.0), torch.full_like(c, torch.finfo(c.dtype).max))


def project_hyperplane_box(p, w, b, norm):
    """Minimal-||d||_norm displacement with w.(p + d) = b and p + d in [0,1] (farthest box move if unreachable).

    p, w: (B, D); b: (B,). Returns d (B, D). Computed in float64 (the breakpoint sums run over all d coordinates).
    """
    dtype = p.dtype
    p, w, b = p.double(), w.double(), b.double()
    c = b - (w * p).sum(1)
    flip = c < 0                                                    # orient so that w.d must grow by c >= 0
    w = torch.where(flip[:, None], -w, w)
    c = c.abs()
    sign = torch.sign(w)
    room = torch.where(w > 0, 1.0 - p, p).clamp_min(0.0)           # room along sign(w_i) inside the box
    room = torch.where(w == 0, torch.zeros_like(room), room)
    aw = w.abs()
    if norm == "linf":
        t = _solve_capped(aw, room, c)
        d = sign * torch.minimum(t[:, None], room)
    elif norm == "l2":
        brk = torch.where(aw > 0, room / aw.clamp_min(torch.finfo(aw.dtype).tiny), torch.zeros_like(room))  # saturation
        lam = _solve_capped(aw ** 2, brk, c)
        d = sign * torch.minimum(lam[:, None] * aw, room)
    elif norm == "l1":
        aw_sorted, order = aw.sort(dim=1, descending=True)
        room_sorted = room.gather(1, order)
        mass = aw_sorted * room_sorted                               # w.d gained by filling coordinate k
        before = mass.cumsum(1) - mass
        fill = ((c[:, None] - before) / aw_sorted.clamp_min(torch.finfo(aw.dtype).tiny)).clamp(min=0.0)
        fill = torch.minimum(fill, room_sorted)
        fill = torch.where(aw_sorted > 0, fill, torch.zeros_like(fill))
        d = sign * torch.zeros_like(fill).scatter(1, order, fill)
    else:
        raise ValueError(f"unknown norm {norm!r}; choose from linf, l2, l1")
    return d.to(dtype)


def _norm(d, norm):
    """Per-row norm of a (B, D) tensor."""
    if norm == "linf":
        return d.abs().amax(1)
    if norm == "l2":
        return d.norm(dim=1)
    return d.abs().sum(1)


def fab_targeted_run(model, x, y, target, *, norm, n_iter):
    """One FAB-T run towards `target` (B,) starting at x. Returns (x_best, dist): the closest misclassified point
    found and its ||.||_norm distance to x (inf, and x itself, where none was found)."""
    bsz = x.shape[0]
    x0 = x.flatten(1)
    x1 = x.clone()
    best, best_dist = x.clone(), torch.full((bsz,), float("inf"), device=x.device, dtype=x.dtype)
    for _ in range(n_iter):
        x1 = x1.detach().requires_grad_(True)
        logits = model(x1)
        g = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)   # z_t - z_y
        (w,) = torch.autograd.grad(g.sum(), [x1])
        with torch.no_grad():
            w = w.flatten(1)
            x1f = x1.detach().flatten(1)
            b = (w * x1f).sum(1) - g.detach()                        # hyperplane w.z = b (linearised g = 0)
            d1 = project_hyperplane_box(x1f, w, b, norm)             # from the iterate
            d2 = project_hyperplane_box(x0, w, b, norm)              # from the original point
            a1, a2 = _norm(d1, norm).clamp_min(1e-8), _norm(d2, norm).clamp_min(1e-8)
            alpha = (a1 / (a1 + a2)).clamp(0.0, ALPHA_MAX)[:, None]
            x1f = ((1 - alpha) * (x1f + ETA * d1) + alpha * (x0 + ETA * d2)).clamp(0.0, 1.0)
            x1 = x1f.view_as(x)
            is_adv = model(x1).argmax(1) != y
            dist = _norm(x1f - x0, norm)
            closer = is_adv & (dist < best_dist)                     # masks, not boolean indexing: no host sync
            best = torch.where(closer.view(-1, 1, 1, 1), x1, best)
            best_dist = torch.where(closer, dist, best_dist)
            x1 = torch.where(is_adv.view(-1, 1, 1, 1), x + BETA * (x1 - x), x1)   # step back towards x
    return best, best_dist


def fab_targeted(model, x, y, todo, *, norm, eps, n_iter=100, n_target=9):
    """FAB-T on the points in `todo` (B,) bool, targets tried in order on the still-unbroken points.

    Returns (x_adv, broken): broken where a misclassified point within eps was found (then stored in x_adv).
    """
    def attempt(idx, target):
        cand, dist = fab_targeted_run(model, x[idx], y[idx], target, norm=norm, n_iter=n_iter)
        with torch.no_grad():
            hit = (model(cand).argmax(1) != y[idx]) & (dist <= eps)
        return hit, cand

    return run_attempts(model, x, todo, attempt, n_target=n_target)
