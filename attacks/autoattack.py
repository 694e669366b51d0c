"""AutoAttack (Croce & Hein, ICML 2020), own implementation: the standard version for l_inf, l_2 and l_1.

    x_adv, robust = attacks.autoattack(model, x, y, norm="linf")            # eps = 8/255, standard version
    x_adv, robust = attacks.autoattack(model, x, y, norm="l1", version="apgd")   # APGD-CE + APGD-T only (E-AT)

Reference: https://github.com/fra31/auto-attack (autoattack/autoattack.py and its components); APGD-l1 as in
Croce & Hein, ICML 2021, "Mind the box".
Components (modules _apgd.py, _fab.py, _square.py) are run in AutoAttack's order, each only on the points that are
still robust (correctly classified and not broken by an earlier component), each starting from the clean image.
The result is the point-wise worst case: robust[i] is True iff x[i] is correctly classified and no component found
a misclassified point within the eps-ball; x_adv[i] is the first such point found (x[i] where none was).
A component's candidate is only accepted after the runner re-checks misclassification and the budget.

Standard settings (AutoAttack's set_version('standard')):
  | norm     | APGD-CE                     | APGD-T (targeted DLR)              | FAB-T             | Square       |
  | linf, l2 | 100 it, 1 restart           | 100 it, 9 targets x 1 restart      | 100 it, 9 targets | 5000 queries |
  | l1       | 100 it, 5 restarts, 3e/2e/e | 100 it, 5 targets x 1, 3e/2e/e     | 100 it, 9 targets | 5000 queries |
version='apgd': APGD-CE + APGD-T only, same per-norm settings (what E-AT reports,
https://github.com/fra31/robust-finetuning).
Targets are capped at (number of classes - 1); APGD-T needs >= 4 classes, DLR >= 3 (ValueError below that).
Default eps: the CIFAR-10 budgets of E-AT (linf 8/255, l2 0.5, l1 12).

Seeding: each component gets a fresh local torch.Generator seeded with `seed` (AutoAttack reseeds every attack
with the same seed); the global RNG is not touched. Deterministic on CPU. The model is used as it is (the caller
puts it in eval mode; model.training is never changed) and no parameter .grad is written.
Cost note: FAB-T and Square dominate on robust models (https://github.com/fra31/auto-attack/issues/45); on a
2-core CPU pass smaller n_iter / n_queries only for tests (the defaults are AutoAttack's).

Deviations from the reference (details in each module): first APGD oscillation check uses the starting loss
(_apgd.py); Square-L1 proposal is our l_1 transcription of the l_2 rule (_square.py); random draws are made
with the full batch's shape and indexed, so a point's result does not depend on which other points are still
robust (AutoAttack draws for the current sub-batch).
Depends on: attacks/_common.py, attacks/_apgd.py, attacks/_fab.py, attacks/_square.py
"""

import time

import torch

from attacks._apgd import NORMS, apgd
from attacks._common import check_inputs, lp_norm
from attacks._fab import fab_targeted
from attacks._square import square

DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}   # CIFAR-10 budgets (E-AT's eps_dict)
VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "apgd": ("apgd-ce", "apgd-t")}
N_ITER, N_QUERIES = 100, 5000                              # AutoAttack defaults
# per-norm standard settings (AutoAttack's set_version('standard')): APGD-CE restarts, APGD-T targets, large-eps
# schedule, FAB-T targets
SETTINGS = {
    "linf": {"ce_restarts": 1, "t_targets": 9, "large_eps": False, "fab_targets": 9},
    "l2": {"ce_restarts": 1, "t_targets": 9, "large_eps": False, "fab_targets": 9},
    "l1": {"ce_restarts": 5, "t_targets": 5, "large_eps": True, "fab_targets": 9},
}
P_NORM = {"linf": "inf", "l2": 2, "l1": 1}
BUDGET_RTOL = 1e-5   # float32 slack when re-checking ||x_adv - x|| <= eps


def run_component(name, model, x, y, todo, *, norm, eps, seed=0, n_iter=N_ITER, n_queries=N_QUERIES):
    """Run one AutoAttack component on the points in `todo` (B,) bool with its standard per-norm settings.

    name in {'apgd-ce', 'apgd-t', 'fab-t', 'square'}. Returns (x_adv, broken) (B,...)/(B,): candidates the
    component reports as adversarial (x elsewhere). Uses a fresh generator seeded with `seed`.
    """
    cfg = SETTINGS[norm]
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    if name == "apgd-ce":
        return apgd(model, x, y, todo, norm=norm, eps=eps, loss="ce", n_iter=n_iter, n_restarts=cfg["ce_restarts"],
                    large_eps=cfg["large_eps"], generator=gen)
    if name == "apgd-t":
        return apgd(model, x, y, todo, norm=norm, eps=eps, loss="dlr-t", n_iter=n_iter, n_restarts=1,
                    n_target=cfg["t_targets"], large_eps=cfg["large_eps"], generator=gen)
    if name == "fab-t":
        return fab_targeted(model, x, y, todo, norm=norm, eps=eps, n_iter=n_iter, n_target=cfg["fab_targets"])
    if name == "square":
        return square(model, x, y, todo, norm=norm, eps=eps, n_queries=n_queries, generator=gen)
    raise ValueError(f"unknown AutoAttack component {name!r}; choose from {VERSIONS['standard']}")


def accept_adversarial(model, x, y, x_cand, *, norm, eps):
    """(B,) bool: x_cand is misclassified and within the eps-ball (the runner's re-check of every candidate)."""
    with torch.no_grad():
        wrong = model(x_cand).argmax(1) != y
    inside = lp_norm(x_cand - x, P_NORM[norm]) <= eps * (1 + BUDGET_RTOL) + 1e-7
    in_box = (x_cand >= 0).flatten(1).all(1) & (x_cand <= 1).flatten(1).all(1)
    return wrong & inside & in_box


def cost(norm, version="standard", n_iter=N_ITER, n_queries=N_QUERIES, n_classes=10):
    """(input-gradient passes, forward passes) per attacked point if every component runs on it (a point leaves at
    the first component that breaks it). APGD: one gradient pass per iteration and attempt; FAB-T: one gradient pass
    (the targeted difference of two logits) and one forward (the misclassification check); Square: one forward per
    query."""
    cfg, t = SETTINGS[norm], min(n_classes - 1, 9)
    fab = n_iter * min(cfg["fab_targets"], t) if "fab-t" in VERSIONS[version] else 0
    grad = {"apgd-ce": n_iter * cfg["ce_restarts"], "apgd-t": n_iter * min(cfg["t_targets"], t)}
    return sum(grad[c] for c in VERSIONS[version] if c in grad) + fab, fab + (n_queries if fab else 0)


def autoattack(model, x, y, *, norm="linf", eps=None, version="standard", seed=0, n_iter=N_ITER,
               n_queries=N_QUERIES, batch_size=None, log=None):
    """AutoAttack: components in order, each on the still-robust points; returns (x_adv, robust (B,) bool).

    n_iter (APGD, FAB) and n_queries (Square) default to AutoAttack's 100 / 5000; lower them only for tests.
    batch_size: the points are attacked in fixed chunks of this size (each chunk draws as a batch of its own), every
    component over all chunks before the next one; log(str), if given, gets one line per component, as AutoAttack
    prints: points still robust, robust accuracy so far, time.
    """
    check_inputs(x, y, eps)
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; choose from {tuple(VERSIONS)}")
    if int(n_iter) < 1 or int(n_queries) < 1:
        raise ValueError(f"n_iter and n_queries must be >= 1, got {n_iter!r}, {n_queries!r}")
    eps = DEFAULT_EPS[norm] if eps is None else float(eps)
    x, t0, n = x.detach(), time.time(), len(x)
    chunks = [slice(i, i + (batch_size or n)) for i in range(0, n, batch_size or n)]
    with torch.no_grad():
        logits = torch.cat([model(x[c]) for c in chunks])
    if logits.shape[1] < 4:   # every version runs APGD-T (targeted DLR needs >= 4 classes)
        raise ValueError(f"AutoAttack's APGD-T (targeted DLR loss) needs >= 4 classes, the model has "
                         f"{logits.shape[1]}")
    robust = logits.argmax(1) == y                      # misclassified clean points are never attacked
    x_adv = x.clone()
    say = (lambda what: log(f"  AutoAttack-{norm} {what:<8}: {int(robust.sum())}/{n} still robust, robust accuracy "
                            f"{robust.float().mean().item():.2%} ({time.time() - t0:.1f}s)")) if log else (lambda w: 0)
    say("clean")
    if eps == 0:
        return x_adv, robust
    for name in VERSIONS[version]:
        if not robust.any():
            break
        for c in chunks:
            todo = robust[c].clone()
            idx = todo.nonzero().squeeze(1)   # the attacked points (one host sync per component and chunk)
            if idx.numel() == 0:
                continue
            cand, _ = run_component(name, model, x[c], y[c], todo, norm=norm, eps=eps, seed=seed, n_iter=n_iter,
                                    n_queries=n_queries)
            # re-check the candidates of the attacked points only; masks, not boolean indexing (no further sync)
            new = accept_adversarial(model, x[c][idx], y[c][idx], cand[idx], norm=norm, eps=eps)
            x_adv[c][idx] = torch.where(new.view(-1, 1, 1, 1), cand[idx], x_adv[c][idx])
            robust[c][idx] = robust[c][idx] & ~new
        say(name)
    return x_adv.detach(), robust
