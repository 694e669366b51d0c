"""Meta-CAAT -- Combining Adversaries and Anti-adversaries in Training (Zhou, Wu, Yang), reference implementation.

Each training sample is perturbed either adversarially (TRADES boundary loss) or anti-adversarially (descend its
CE), with a per-sample bound (grad-based Eq. 26 or FRL's class-wise ReMargin). A weighting network f_Omega maps six
training characteristics (Eqs. 20-24) to the soft direction weights (alpha_x, beta_x) of Eq. (25); Omega is learned
online on a clean meta set with the one-step look-ahead of Eqs. (27)-(29) (Algorithm 1), under FRL's fairness
constraints (Eq. 19). Four orthogonal choices -- direction, bound, reweighting, loss -- also give the baselines of
the paper's tables and the Sec. 6.5 Settings I-IV (the preset table: README, caat_meta.py section). Comments
"Eq. (k)" and "Alg. 1, line n" refer to the CAAT paper; "README Dn" to the numbered details there. Upstream code cited
in comments: FRL (Xu et al. 2021) https://github.com/hannxu123/fair_robust, TRADES https://github.com/yaodongyu/TRADES,
Meta-Weight-Net https://github.com/xjtushujun/meta-weight-net, robust overfitting (Rice et al. 2020)
https://github.com/locuslab/robust_overfitting.

    python caat_meta.py --dataset cifar10                                                     # Alg. 1, Setting IV
    python caat_meta.py --dataset cifar10 --scenario noisy --noise pairflip --noise-rate 0.2
    python caat_meta.py --direction adversarial --bound fixed --reweight none --lam 6         # TRADES (beta = 6)
    python caat_meta.py --dataset fake --device cpu --width 8 --epochs 1 --max-steps 2 --attack-steps 1 \
        --eval-examples 8                                                                     # smoke test

Writes args.json, corruption.pt, log.jsonl, ckpt.pt, model.pt, results.json into the run directory printed first.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import attacks
from attacks import ATTACKS
from attacks.lp import TRADES_INIT_STD

SCRIPT = "caat_meta"
REMARGIN_CLAMP = (0.98, 3.0)   # FRL frlrmrw.py: eps_c = eps * clamp(exp(2 phi_m), 0.98, 3)


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_flags(parser)
    add_caat_flags(parser)
    g = parser.add_argument_group("Meta-CAAT (Alg. 1); the baselines and Settings I-IV are presets of these (README)")
    g.add_argument("--direction", type=str, default="learned", choices=("learned", "adversarial", "head-tail"),
                   help="learned: f_Omega (Eq. 25); adversarial: every sample; head-tail: tail classes adversarial, "
                        "head classes anti-adversarial (Sec. 6.5 'Without')")
    g.add_argument("--bound", type=str, default="grad", choices=("grad", "fixed", "remargin"),
                   help="grad: Eq. (26); fixed: --eps; remargin: FRL's class-wise bound")
    g.add_argument("--reweight", type=str, default="nat-bdy", choices=("nat-bdy", "nat", "rob", "none"),
                   help="FRL class weights on the natural and boundary terms (Eq. 19), on the natural term only "
                        "(FRL ReMargin), on the whole loss from robust errors (Baseline ReWeight), or none")
    g.add_argument("--loss", type=str, default="trades", choices=("trades", "ce"),
                   help="adversary term: CE(x) + lam KL(x, x_adv) from a KL attack (TRADES), or CE(x_adv) from a CE "
                        "attack with a uniform start (PGD-AT, Madry et al.)")
    g.add_argument("--lam", "--beta", dest="lam", type=fraction, default=1.5,
                   help="lambda of Eq. (25) (= TRADES/FRL beta; CAAT grid {2/3, 1, 1.5, 6})")
    g.add_argument("--bound-offset", type=float, default=0.9, help="varepsilon of Eq. (26)")
    g.add_argument("--tau", type=float, default=0.1, help="final tau of the tau-softmax of f_Omega (Sec. 4.3)")
    g.add_argument("--tau-start", type=float, default=1.0,
                   help="tau anneals geometrically from this to --tau over the first half of the iterations")
    g.add_argument("--meta-lr", type=float, default=1e-4, help="eta_2 of Eq. (28) (SGD, momentum below)")
    g.add_argument("--meta-momentum", type=float, default=0.9)
    g.add_argument("--meta-weight-decay", type=float, default=5e-4)
    g.add_argument("--meta-init-std", type=float, default=0.1, help="std of f_Omega's random last layer")
    g.add_argument("--meta-batch-size", type=int, default=128, help="m of Alg. 1")
    g.add_argument("--remargin-rate", type=float, default=0.2, help="ReMargin multiplier step")
    g.add_argument("--drop-characteristic", type=str, default="",
                   help="comma list of zeta indices 1..6 to zero (Fig. 15)")
    return parser


def get_args(argv=None):
    return parse_args(make_parser(), argv, check_args)


def check_args(args):
    """Meta-CAAT's flags (the shared CAAT flags are checked by check_caat_args)."""
    check_caat_args(args, SCRIPT)
    if args.meta_batch_size < 1 or args.lam < 0 or args.tau <= 0 or args.tau_start <= 0 or args.meta_lr <= 0:
        raise ValueError(f"need --meta-batch-size >= 1, --lam >= 0, --tau, --tau-start, --meta-lr > 0; got "
                         f"{args.meta_batch_size}, {args.lam}, {args.tau}, {args.tau_start}, {args.meta_lr}")
    if not all(s.strip() in ("1", "2", "3", "4", "5", "6") for s in args.drop_characteristic.split(",") if s.strip()):
        raise ValueError(f"--drop-characteristic takes indices 1..6 of {CHARACTERISTICS}, "
                         f"got {args.drop_characteristic!r}")
    if args.drop_characteristic and args.direction != "learned":
        raise ValueError(f"--drop-characteristic removes an input of f_Omega; --direction is {args.direction!r}")


# ----------------------------------------------------------------------------------------------------------------
# Sec. 4.3: the weighting network f_Omega and the grad-based bound (Eq. 26)
# ----------------------------------------------------------------------------------------------------------------

class WeightingNet(nn.Module):
    """f_Omega: zeta (B, 6) -> MLP with one hidden layer -> Softmax((h w + b) / tau) = (alpha_x, beta_x) (Eq. 25)."""

    def __init__(self, hidden=100, tau=0.1, init_std=0.1):
        super().__init__()
        self.tau = tau
        self.net = nn.Sequential(nn.Linear(len(CHARACTERISTICS), hidden), nn.ReLU(), nn.Linear(hidden, 2))
        # DEVIATION: the paper gives no init; a small random last layer (README D15) -- a zero one makes every sample's
        # logit gap move by the same batch-wide amount, so the directions collapse to one side
        nn.init.normal_(self.net[2].weight, std=init_std)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, zeta):
        return F.softmax(self.net(zeta) / self.tau, dim=1)


def tau_at(step, total, args):
    """tau anneals geometrically from --tau-start to --tau over the first half of the iterations (README D15)."""
    frac = min(step / max(0.5 * total, 1), 1.0)
    return args.tau_start * (args.tau / args.tau_start) ** frac


def input_grad_norms(model, logits_clean, x_adv, x_anti, y):
    """g of Eq. (26): ||d KL(f(x) || f(x_adv)) / d x_adv||_2 and ||d CE(f(x_anti), y) / d x_anti||_2, each (B,)."""
    p_clean = F.softmax(logits_clean.detach().float(), 1)
    xa, xt = x_adv.detach().requires_grad_(True), x_anti.detach().requires_grad_(True)
    kl = F.kl_div(F.log_softmax(model(xa), 1), p_clean, reduction="sum")   # per-sample terms are independent
    ce = F.cross_entropy(model(xt), y, reduction="sum")
    (g_adv,) = torch.autograd.grad(kl, [xa])
    (g_anti,) = torch.autograd.grad(ce, [xt])
    return g_adv.flatten(1).norm(dim=1), g_anti.flatten(1).norm(dim=1)


def grad_bound(g_adv, g_anti, a, b, eps, offset=0.9):
    """Eq. (26): eps_x = (a g_adv_bar + b g_anti_bar + offset) eps, with g_bar = g / (batch max of g) in [0, 1].

    a, b: (B,) direction weights alpha_x, beta_x (detached); so eps_x lies in [offset eps, (1 + offset) eps].
    """
    g_adv_bar = g_adv / g_adv.max().clamp_min(1e-12)     # "normalized" in Eq. (26): our reading (README D16)
    g_anti_bar = g_anti / g_anti.max().clamp_min(1e-12)
    return (a * g_adv_bar + b * g_anti_bar + offset) * eps


def remargin_eps(fair, eps):
    """FRL ReMargin: eps_c = eps * clamp(exp(2 phi_m(c)), 0.98, 3), (C,)."""
    return eps * torch.exp(2 * fair.phi["m"]).clamp(*REMARGIN_CLAMP)


# ----------------------------------------------------------------------------------------------------------------
# Sec. 4.3.2: the one-step look-ahead (Eqs. 27-29)
# ----------------------------------------------------------------------------------------------------------------

def perturb(model, x, y, eps, steps, direction, loss, seed):
    """K sign steps of eps_i/4 (eta_0) inside each sample's l_inf ball (Alg. 1, lines 7-10); `seed` replays the init.

    loss "kl": ascend KL(f(x) || f(.)) from x + 0.001 N(0, I) (Alg. 1, line 5; TRADES); "ce": ascend (direction +1,
    PGD-AT, uniform start) or descend (-1, the anti-adversary, from x + 0.001 N(0, I)) CE(f(.), y).
    """
    gen = torch.Generator(device=x.device).manual_seed(seed)
    init = "uniform" if loss == "ce" and direction > 0 else "trades"
    return ATTACKS["linf"](model, x, y, eps=eps, steps=steps, step_size=eps / 4, init=init, direction=direction,
                           loss=loss, generator=gen)


def per_sample_losses(forward, x, x_adv, x_anti, y, loss):
    """(B,) terms of Eq. (25): "nat" CE(f(x), y) and "bdy" KL(f(x) || f(x_adv)) (TRADES: both branches carry grad),
    or "nat" CE(f(x_adv), y) and "bdy" 0 (--loss ce, PGD-AT); "anti" CE(f(x_anti), y) when x_anti is given."""
    if loss == "ce":
        out = {"nat": F.cross_entropy(forward(x_adv), y, reduction="none")}
        out["bdy"] = torch.zeros_like(out["nat"])
    else:
        logits = forward(x)
        out = {"nat": F.cross_entropy(logits, y, reduction="none"),
               "bdy": F.kl_div(F.log_softmax(forward(x_adv), 1), F.softmax(logits, 1), reduction="none").sum(1)}
    if x_anti is not None:
        out["anti"] = F.cross_entropy(forward(x_anti), y, reduction="none")
    return out


def weighted_loss(t, a, b, w_nat, w_bdy, lam):
    """Eq. (25)/(27) with FRL's class weights: sum a w_nat CE / sum w_nat + lam sum a w_bdy KL / sum w_bdy
    + sum b w_nat CE_anti / sum w_nat. Uniform weights give the plain batch mean of Eq. (27) (README D19).
    torchrun: the weight sums are the global batch's, so the loss is this rank's share of the global one."""
    sum_nat, sum_bdy = all_sum(torch.stack([w_nat.sum(), w_bdy.sum()]))
    # DEVIATION: each term is normalised by its own weight sum, for every method; FRL's ReMargin code (frlrm.py)
    # divides both by the joint sum (README D19)
    loss = (a * w_nat * t["nat"]).sum() / sum_nat + lam * (a * w_bdy * t["bdy"]).sum() / sum_bdy
    if "anti" in t:
        loss = loss + (b * w_nat * t["anti"]).sum() / sum_nat
    return loss


def meta_step(model, wnet, wopt, zeta, x, x_adv, x_anti, y, w_nat, w_bdy, x_meta, y_meta, x_meta_adv, lr, args,
              n_meta=None):
    """Eqs. (27)-(28): virtual SGD step W_hat(Omega), robust meta loss of W_hat on the clean meta batch, step on Omega.

    The classifier runs through torch.func.functional_call on CLONED buffers, so the virtual and meta forwards (train
    mode, batch statistics) leave the real BN running statistics untouched. Returns the meta loss; Omega's gradient
    stays in .grad. n_meta: the global meta batch's size under torchrun (default: this one's).
    """
    model = getattr(model, "_orig_mod", model)   # --compile: the uncompiled module (double backward needs it)
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    w = wnet(zeta)                                                        # (B, 2), differentiable in Omega
    t = per_sample_losses(lambda inp: functional_call(model, (params, buffers), (inp,)), x, x_adv, x_anti, y, args.loss)
    grads = torch.autograd.grad(weighted_loss(t, w[:, 0], w[:, 1], w_nat, w_bdy, args.lam), list(params.values()),
                                create_graph=True)
    if world()[1] > 1:   # torchrun: the global batch's virtual step, by an all-reduce that autograd differentiates
        from torch.distributed.nn.functional import all_reduce
        flat = all_reduce(torch.cat([g.flatten() for g in grads]))
        grads = [v.view_as(g) for g, v in zip(grads, flat.split([g.numel() for g in grads]))]
    fast = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}   # Eq. (27): W_hat, eta_1 = current lr
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    # DEVIATION: Eq. (28) weights the meta loss by alpha/beta of the meta samples; we use the unweighted robust loss
    # (README D14) -- the literal form is minimised by sending every meta sample to the anti-adversary branch
    m = per_sample_losses(lambda inp: functional_call(model, (fast, buffers), (inp,)), x_meta, x_meta_adv, None,
                          y_meta, args.loss)
    n_meta = n_meta or len(y_meta)                                        # torchrun: the global meta batch size
    meta_loss = (m["nat"] + args.lam * m["bdy"]).sum() / n_meta         # torchrun: this rank's share of the mean
    omega = list(wnet.parameters())
    wopt.zero_grad(set_to_none=True)
    for p, g in zip(omega, torch.autograd.grad(meta_loss, omega)):       # second order: through W_hat(Omega)
        p.grad = g
    sync_gradients(omega)                                                 # torchrun: the global meta gradient
    wopt.step()                                                           # Eq. (28)
    return all_sum(meta_loss.detach())


def trades_init(x, seed):
    """x + 0.001 N(0, I) (Alg. 1, line 5) from a generator seeded with `seed`, exactly as attacks.linf draws it."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return (x + TRADES_INIT_STD * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# One iteration of Algorithm 1 (lines 4-13); the baselines are the same step with other choices
# ----------------------------------------------------------------------------------------------------------------

def train_step(model, wnet, opt, wopt, x, y, meta_batch, ctx, args):
    """Alg. 1, lines 4-13 on the global batch (x, y). ctx: class_counts, class_loss (updated here), w_nat, w_bdy,
    eps_cls, head, keep_zeta.

    Returns per-sample alpha (adversary weight; > 0.5 counts as adversary), bound, margin and the loss (on the device).
    Under torchrun each rank takes its slice of the batch and of the meta batch; the virtual step, the meta gradient
    and the classifier's gradient are the global ones, the per-sample tensors returned are the rank's (README D25).
    """
    x, y = local_part(x), local_part(y)
    n_meta = len(meta_batch[1]) if meta_batch is not None else 0
    meta_batch = meta_batch and (local_part(meta_batch[0]), local_part(meta_batch[1]))
    learned, n = args.direction == "learned", len(y)
    model.eval()   # characteristics and TRADES-style attacks in eval mode (README D3)
    with torch.no_grad():   # Sec. 4.2: characteristics on the clean x, then the zeta_6 EMA update
        logits = model(x)
        raw = raw_characteristics(logits, y, ctx["class_counts"], ctx["class_loss"])
        ctx["class_loss"] = update_class_loss(ctx["class_loss"], raw[:, 0], y)
        zeta = scale_characteristics(raw, len(ctx["class_counts"])) * ctx["keep_zeta"]
        if learned:
            a = wnet(zeta)[:, 0]                                         # alpha of the current Omega, for Eq. (26)
        elif args.direction == "head-tail":                              # Sec. 6.5 "Without"
            a = (~ctx["head"][y]).float()
        else:
            a = torch.ones(n, device=x.device)
    b = 1 - a
    seed_adv, seed_anti, seed_meta = torch.randint(0, 2 ** 62, (3,)).tolist()
    if args.bound == "remargin":                                         # Alg. 1, line 6: FRL's class-wise bound
        eps = ctx["eps_cls"][y]
    elif args.bound == "grad":                                           # Alg. 1, line 6: Eq. (26) at the init points
        # (the 0.001 N init lies far inside every eps ball, so attacks.linf's projection leaves it unchanged)
        g_adv, g_anti = input_grad_norms(model, logits, trades_init(x, seed_adv), trades_init(x, seed_anti), y)
        eps = grad_bound(g_adv, g_anti, a, b, args.eps, args.bound_offset)
    else:
        eps = torch.full((n,), args.eps, device=x.device)
    adv_loss, attacked = "ce" if args.loss == "ce" else "kl", attack_model(model, args.attack_bf16)   # attacks' view
    model.train(args.loss == "ce")   # PGD-AT attacks in train mode, as Madry et al. and Rice et al. (README D20)
    x_adv = perturb(attacked, x, y, eps, args.attack_steps, 1, adv_loss, seed_adv)                     # line 8
    x_anti = None if args.direction == "adversarial" else perturb(attacked, x, y, eps, args.attack_steps, -1, "ce",
                                                                  seed_anti)                           # line 9
    model.train()
    w_nat, w_bdy = ctx["w_nat"][y], ctx["w_bdy"][y]
    if learned:   # Alg. 1, lines 12-13: Eqs. (27), (28); then alpha/beta from the UPDATED Omega for Eq. (29)
        model.eval()   # the meta batch's adversary against the current W, fixed eps (meta loss of meta_step)
        x_meta_adv = perturb(attacked, *meta_batch, torch.full((len(meta_batch[1]),), args.eps, device=x.device),
                             args.attack_steps, 1, adv_loss, seed_meta)
        model.train()
        meta_step(model, wnet, wopt, zeta, x, x_adv, x_anti, y, w_nat, w_bdy, *meta_batch, x_meta_adv,
                  opt.param_groups[0]["lr"], args, n_meta)
        with torch.no_grad():
            a = wnet(zeta)[:, 0]
        b = 1 - a
    opt.zero_grad(set_to_none=True)
    loss = weighted_loss(per_sample_losses(model, x, x_adv, x_anti, y, args.loss), a, b, w_nat, w_bdy, args.lam)
    loss.backward()                                                      # Eq. (29)
    sync_gradients(model.parameters())                                   # torchrun: the global batch's gradient
    opt.step()
    return {"alpha": a, "eps": eps, "margin": raw[:, 1], "loss": all_sum(loss.detach())}


# ----------------------------------------------------------------------------------------------------------------
# main: run setup -> classifier, f_Omega -> epochs [FRL multipliers, Alg. 1 per batch, evaluate, log, ckpt] -> results
# ----------------------------------------------------------------------------------------------------------------

def main(args):
    args, resume, device, out_dir, data, sc = start_run(args, SCRIPT, "wnet")
    C = data["num_classes"]
    model, net, opt, sched, total = make_classifier(args, data, device, len(sc["train_y"]))   # net: the forward
    wnet = WeightingNet(args.hidden, tau_at(0, total, args), args.meta_init_std).to(device)   # Alg. 1, line 1
    # DEVIATION: the paper gives no optimiser for Omega; SGD with momentum (Meta-Weight-Net's WRN script), not Adam
    # (README D15): Adam's sign-like first steps push every sample's logit gap the same way
    wopt = make_sgd(wnet.parameters(), device, args.meta_lr, args.meta_momentum, args.meta_weight_decay)
    fair = Fairness(C, args)
    uses = {"nat-bdy": ("nat", "bdy"), "nat": ("nat",), "rob": ("rob",), "none": ()}[args.reweight]
    uses += ("m",) if args.bound == "remargin" else ()
    data_gen = torch.Generator().manual_seed(args.seed)        # shuffling + augmentation
    meta_gen = torch.Generator().manual_seed(args.seed + 1)    # meta-batch draws (Alg. 1, line 3)
    head = torch.zeros(C, dtype=torch.bool, device=device)     # "Without": the larger half of the classes is head
    head[torch.sort(sc["class_counts"].cpu(), descending=True, stable=True).indices[: C // 2]] = True
    keep_zeta = torch.ones(len(CHARACTERISTICS), device=device)
    for i in [int(s) for s in args.drop_characteristic.split(",") if s.strip()]:
        keep_zeta[i - 1] = 0.0                                  # Fig. 15 ablation: zeta_i removed (input set to 0)
    ctx = {"class_counts": sc["class_counts"], "class_loss": torch.full((C,), math.log(C), device=device),
           "head": head, "keep_zeta": keep_zeta}
    state = new_state()
    nets = {"model": model, "optimizer": opt, "scheduler": sched, "wnet": wnet, "wnet_optimizer": wopt}
    broadcast_modules(model, wnet)                              # torchrun: rank 0's initial networks everywhere
    if resume is not None:
        restore_run(resume, nets, fair, ctx, state, out_dir, data_gen, meta_gen)
    elif args.init_ckpt:
        evaluate_initial(net, data, state, args, out_dir)
    t_start = time.time() - state["time_s"]

    for epoch in range(state["epoch"], args.epochs):
        t_epoch = time.time()
        rec = update_fairness(fair, uses, net, sc, epoch, args)   # Eq. (19) via FRL, once per epoch
        w_rob = fair.class_weight("rob").to(device)
        ctx.update(w_nat=w_rob if "rob" in uses else fair.class_weight("nat").to(device),
                   w_bdy=w_rob if "rob" in uses else fair.class_weight("bdy").to(device),
                   eps_cls=remargin_eps(fair, args.eps).to(device))
        stats = DirectionStats(C, device)
        for x, y, noisy in epoch_batches(sc, data, args, data_gen, state, stats, out_dir, total):   # Alg. 1, line 3
            meta_batch = None
            if args.direction == "learned":    # m clean meta samples, no augmentation
                mi = to_device(torch.randint(0, len(sc["meta_y"]), (args.meta_batch_size,), generator=meta_gen), device)
                meta_batch = (to_float(sc["meta_x"][mi]), sc["meta_y"][mi])
            wnet.tau = tau_at(state["step"], total, args)
            s = train_step(net, wnet, opt, wopt, x, y, meta_batch, ctx, args)
            sched.step()
            stats.add(y, noisy, *gather_batch(s["alpha"], s["eps"], s["margin"]), s["loss"])   # every rank's
        rec.update({"lr": opt.param_groups[0]["lr"], "caat/tau": wnet.tau, **stats.log(),
                    "frl/w_nat": ctx["w_nat"].tolist(), "frl/w_bdy": ctx["w_bdy"].tolist(),
                    "frl/eps_class": (255 * ctx["eps_cls"]).tolist()})
        if end_epoch(net, data, state, rec, epoch, t_epoch, t_start, args, out_dir, nets, fair, ctx,
                     (data_gen, meta_gen), f"adv ratio {rec['caat/adv_ratio']:.2f}"):
            break
    results = finish(model, data, state, args, out_dir, t_start)
    end_distributed()
    return results


def method_name(args):
    """The README preset these flags make, or a description of the combination."""
    presets = {("adversarial", "fixed", "none", "ce"): "pgd-at", ("adversarial", "fixed", "none", "trades"): "trades",
               ("adversarial", "fixed", "nat-bdy", "trades"): "frl-reweight",
               ("adversarial", "remargin", "nat", "trades"): "frl-remargin",
               ("adversarial", "remargin", "nat-bdy", "trades"): "frl-both",
               ("adversarial", "fixed", "rob", "trades"): "baseline-reweight",
               ("learned", "grad", "nat-bdy", "trades"): "meta-caat"}
    key = (args.direction, args.bound, args.reweight, args.loss)
    return presets.get(key, "meta-caat/" + "/".join(key))


# ----------------------------------------------------------------------------------------------------------------
# Shared by both CAAT scripts (byte-identical copies, tests/test_copies.py): flags, characteristics (Eqs. 20-24),
# data scenarios, FRL's fairness multipliers (Eq. 19), class-wise metrics (Eqs. 45-48), the run scaffolding
# ----------------------------------------------------------------------------------------------------------------

# ==== BEGIN SHARED: caat-flags (canonical: caat_meta.py; copies: caat_reinforce.py) ====
def add_caat_flags(parser):
    """Data scenario, FRL multipliers (Eq. 19) and per-epoch metrics: the same flags and defaults in both scripts."""
    parser.set_defaults(epochs=100, lr=0.1)   # default: from scratch, 100 epochs, lr 0.1 (x0.1 at 50%, 75%)
    g = parser.add_argument_group("CAAT data scenario (Sec. 6.3, 6.4), fairness constraints (Eq. 19), metrics")
    g.add_argument("--scenario", type=str, default="standard", choices=("standard", "noisy", "longtail"))
    g.add_argument("--noise", type=str, default="uniform", choices=("uniform", "pairflip"), help="Sec. 6.3")
    g.add_argument("--noise-rate", type=float, default=0.2, help="r: fraction of training labels resampled")
    g.add_argument("--imbalance", type=float, default=10.0, help="IF of the long-tailed profile (Cui et al.)")
    g.add_argument("--meta-per-class", type=int, default=0,
                   help="clean meta / validation images per class (0 = 300, FRL and CAAT; 5 for --dataset fake)")
    g.add_argument("--eps", type=fraction, default=8 / 255, help="predefined bound epsilon and test PGD bound")
    g.add_argument("--hidden", type=int, default=100, help="hidden width of the strategy network f_Omega")
    g.add_argument("--tau1", type=float, default=0.05, help="natural-error slack of Eq. (19)")
    g.add_argument("--tau2", type=float, default=0.05, help="boundary-error slack of Eq. (19)")
    g.add_argument("--frl-rate", type=float, default=0.05, help="multiplier step (boundary: 2x), halved every 40 ep.")
    g.add_argument("--frl-limit", type=float, default=0.5, help="cap on the sum of each multiplier vector")
    g.add_argument("--val-attack-steps", type=int, default=20, help="PGD steps on the validation split (FRL)")
    g.add_argument("--schedule", type=str, default="piecewise", choices=("piecewise", "constant"),
                   help="lr x0.1 at 50%% and x0.01 at 75%% of the iterations, or constant (FRL's fine-tuning)")
    # DEVIATION: per-epoch test metrics with PGD-10 and PGD-20 (FRL's eval), not the paper's PGD-100 -- cost
    g.add_argument("--eval-pgd-steps", type=str, default="10,20", help="PGD steps of the per-epoch test metrics")
    g.add_argument("--log-every", type=int, default=50,
                   help="steps between progress lines and direction/bound records (kind 'window') in log.jsonl")


def check_caat_args(args, script):
    """Clear errors for bad values of the shared CAAT flags (argparse handles the choices)."""
    if not args.meta_per_class:
        args.meta_per_class = 5 if args.dataset == "fake" else 300
    for flag, low in (("meta_per_class", 1), ("hidden", 1), ("val_attack_steps", 1), ("log_every", 0)):
        if getattr(args, flag) < low:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= {low}")
    if not 0 < args.eps <= 1 or not 0 <= args.noise_rate <= 1 or args.imbalance < 1:
        raise ValueError(f"need 0 < --eps <= 1, 0 <= --noise-rate <= 1, --imbalance >= 1; got {args.eps!r}, "
                         f"{args.noise_rate!r}, {args.imbalance!r}")
    if not all(s.strip().isdigit() and int(s) > 0 for s in args.eval_pgd_steps.split(",")):
        raise ValueError(f"--eval-pgd-steps must be a comma list of positive ints, got {args.eval_pgd_steps!r}")
    if args.attacks not in ("", "linf"):
        raise ValueError(f"{script}.py trains and evaluates with l_inf PGD only; drop --attacks {args.attacks!r}")
    if args.amp:
        raise ValueError(f"--amp is not supported by {script}.py (fp32 only)")
# ==== END SHARED: caat-flags ====


# ==== BEGIN SHARED: caat-characteristics (canonical: caat_meta.py; copies: caat_reinforce.py) ====
CHARACTERISTICS = ("loss", "margin", "grad_norm", "entropy", "class_prop", "class_loss")   # zeta_1..zeta_6
CLASS_LOSS_MOMENTUM = 0.99   # zeta_6 is an EMA over batches (our choice: the paper leaves the averaging open)


def raw_characteristics(logits, y, class_counts, class_loss):
    """The six training characteristics zeta_x of Sec. 4.2, unscaled, (B, 6). Implements Eqs. (20)-(24).

    logits: (B, C) on the clean x (caller: eval mode, no grad); class_counts: (C,) training label counts N_c;
    class_loss: (C,) running mean clean CE of each class.
    """
    p = F.softmax(logits.float(), 1)
    onehot = F.one_hot(y, p.shape[1]).to(p.dtype)
    loss = F.cross_entropy(logits.float(), y, reduction="none")                        # zeta_1: CE loss
    margin = (p * onehot).sum(1) - p.masked_fill(onehot.bool(), float("-inf")).amax(1)   # Eq. (20)
    grad_norm = (onehot - p).norm(dim=1)                                                # Eq. (21)
    entropy = -(p * torch.log2(p.clamp_min(1e-30))).sum(1)                             # Eq. (22), bits
    counts = class_counts.to(p.dtype)
    prop = counts[y] / counts.sum()                                                     # Eq. (23)
    return torch.stack([loss, margin, grad_norm, entropy, prop, class_loss.to(p.dtype)[y]], 1)   # Eq. (24)


def scale_characteristics(z, num_classes):
    """Fixed analytic scaling of zeta to O(1), no batch statistics (our choice): zeta_1/ln C in [0, 5], zeta_2,
    zeta_3/sqrt 2, zeta_4/log2 C, log(C zeta_5) (0 when balanced), zeta_6/ln C."""
    ln_c = math.log(num_classes)
    return torch.stack([(z[:, 0] / ln_c).clamp(0, 5), z[:, 1], z[:, 2] / math.sqrt(2), z[:, 3] / math.log2(num_classes),
                        torch.log((z[:, 4] * num_classes).clamp_min(1e-12)), z[:, 5] / ln_c], 1)


def update_class_loss(class_loss, losses, y, momentum=CLASS_LOSS_MOMENTUM):
    """zeta_6 bookkeeping: per-class EMA of the batch's mean clean CE; classes absent from the batch keep theirs."""
    # counts by index_add_ into a known size, not bincount (which reads max(y) back to the host on CUDA: a sync)
    n = torch.zeros_like(class_loss).index_add_(0, y, torch.ones_like(losses, dtype=class_loss.dtype))
    total = torch.zeros_like(class_loss).index_add_(0, y, losses.to(class_loss.dtype))
    n, total = all_sum(torch.stack([n, total]))   # torchrun: the global batch's (README D25)
    return torch.where(n > 0, momentum * class_loss + (1 - momentum) * total / n.clamp_min(1), class_loss)
# ==== END SHARED: caat-characteristics ====


# ==== BEGIN SHARED: caat-scenarios (canonical: caat_meta.py; copies: caat_reinforce.py) ====
def split_meta(y, per_class, num_classes):
    """Indices of the last `per_class` images of every class (FRL's validation split) and of the rest."""
    meta = []
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        if len(idx) <= per_class:
            raise ValueError(f"class {c} has {len(idx)} training images, not more than --meta-per-class {per_class}")
        meta.append(idx[-per_class:])
    meta = torch.cat(meta).sort().values
    keep = torch.ones(len(y), dtype=torch.bool, device=y.device)
    keep[meta] = False
    return meta, keep.nonzero().flatten()


def corrupt_labels(y, kind, rate, num_classes, generator):
    """Noisy labels (MW-Net): uniform = with prob. r resample over ALL classes (realised rate r(C-1)/C);
    pairflip ('flip2') = with prob. r move to one of two random other classes fixed per class. -> (labels, pairs)."""
    if num_classes < 3:
        raise ValueError(f"noisy labels need >= 3 classes, got {num_classes}")
    flip = torch.rand(len(y), generator=generator) < rate
    pairs = torch.stack([torch.randperm(num_classes - 1, generator=generator)[:2] for _ in range(num_classes)])
    pairs = pairs + (pairs >= torch.arange(num_classes)[:, None]).long()   # (C, 2) other classes, never c itself
    if kind == "uniform":
        new = torch.randint(0, num_classes, (len(y),), generator=generator)
    else:
        new = pairs[y, torch.randint(0, 2, (len(y),), generator=generator)]
    return torch.where(flip, new, y), pairs


def longtail_index(y, imbalance, num_classes, generator):
    """Cui et al.: class c keeps n_c = floor(n_max (1/IF)^(c/(C-1))) images (a seeded random subset)."""
    n_max = int(torch.bincount(y, minlength=num_classes).max())
    keep = []
    for c in range(num_classes):
        n_c = int(n_max * (1.0 / imbalance) ** (c / (num_classes - 1)))
        idx = (y == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=generator)[:n_c]])
    return torch.cat(keep).sort().values


def build_scenario(args, data):
    """Meta (validation) split first (clean), then noise or long tail on the rest only (Meta-Weight-Net's order)."""
    num_classes, y_all = data["num_classes"], data["train_y"].cpu()
    gen = torch.Generator().manual_seed(args.seed)
    meta_idx, train_idx = split_meta(y_all, args.meta_per_class, num_classes)
    if args.scenario == "longtail":
        train_idx = train_idx[longtail_index(y_all[train_idx], args.imbalance, num_classes, gen)]
    y_clean = y_all[train_idx]
    y_train, pairs = y_clean, torch.zeros(0, 2, dtype=torch.long)
    if args.scenario == "noisy":
        y_train, pairs = corrupt_labels(y_clean, args.noise, args.noise_rate, num_classes, gen)
    dev = data["train_x"].device
    return {"train_x": data["train_x"][train_idx.to(dev)], "train_y": y_train.to(dev),
            "noisy": (y_train != y_clean).to(dev), "meta_x": data["train_x"][meta_idx.to(dev)],
            "meta_y": y_all[meta_idx].to(dev), "class_counts": torch.bincount(y_train, minlength=num_classes).to(dev),
            "saved": {"train_index": train_idx, "meta_index": meta_idx, "label_clean": y_clean,
                      "label_train": y_train, "pairflip_targets": pairs}}
# ==== END SHARED: caat-scenarios ====


# ==== BEGIN SHARED: caat-fairness (canonical: caat_meta.py; copies: caat_reinforce.py) ====
FRL_HALVE_EVERY = 40   # FRL halves its multiplier rate every 40 epochs (FRL's code)


class Fairness:
    """FRL multipliers: phi_nat / phi_bdy (ReWeight), phi_rob (Baseline ReWeight), phi_m (ReMargin); as FRL's code."""

    def __init__(self, num_classes, args):
        self.C, self.args = num_classes, args
        self.phi = {k: torch.zeros(num_classes) for k in ("nat", "bdy", "rob", "m")}

    def update(self, nat_err, rob_err, epoch, uses):
        """One projected multiplier-ascent step on the class violations measured on the validation split."""
        a, rate = self.args, self.args.frl_rate * 0.5 ** (epoch // FRL_HALVE_EVERY)
        bdy_err = rob_err - nat_err
        viol = {"nat": nat_err - nat_err.mean() - a.tau1, "bdy": bdy_err - bdy_err.mean() - a.tau2,
                "rob": rob_err - rob_err.mean() - a.tau1}
        for k, step in (("nat", rate), ("bdy", 2 * rate), ("rob", rate)):   # boundary: twice the rate (FRL)
            if k in uses:
                phi = (self.phi[k] + step * viol[k]).clamp_min(0)
                self.phi[k] = phi * a.frl_limit / phi.sum() if phi.sum() > a.frl_limit else phi
        if "m" in uses:
            self.phi["m"] = self.phi["m"] + a.remargin_rate * viol["bdy"]   # not clipped (FRL)

    def class_weight(self, k):
        """w(c) = 1/C + phi(c) - (1/C) sum_j phi(j) (FRL's cost-sensitive Lagrangian weights), (C,)."""
        return 1.0 / self.C + self.phi[k] - self.phi[k].sum() / self.C

    def state_dict(self):
        return dict(self.phi)

    def load_state_dict(self, d):
        self.phi = {k: v.clone() for k, v in d.items()}


def update_fairness(fair, uses, model, sc, epoch, args):
    """Eq. (19) via FRL: class errors under PGD on the clean validation (= meta) split, then one multiplier step."""
    if not uses:
        return {}
    val = fairness_metrics(model, sc["meta_x"], sc["meta_y"], [args.val_attack_steps], args.eps, fair.C, args)
    fair.update(val["nat_err"], val[f"pgd{args.val_attack_steps}/rob_err"], epoch, uses)
    return {"val/nat_err_avg": val["nat_err_avg"], "val/rob_err_avg": val[f"pgd{args.val_attack_steps}/rob_err_avg"]}
# ==== END SHARED: caat-fairness ====


# ==== BEGIN SHARED: caat-classwise (canonical: caat_meta.py; copies: caat_reinforce.py, eval.py) ====
def classwise_errors(y, correct_clean, correct_adv, num_classes):
    """CAAT Eqs. (45)-(48): per-class natural and robust error (C,) (NaN for classes absent from y), their average
    and worst over the classes present, and the boundary error rob - nat (worst = the class-wise max, as CAAT's
    tables and FRL's code: worst bdy != worst rob - worst nat).

    Robust error (Eq. 47) counts a sample wrong if ANY ||delta|| <= eps misleads the model, delta = 0 included: a
    clean error is a robust error even where the attack's point happens to be classified right.
    """
    y = y.long().cpu()
    n = torch.bincount(y, minlength=num_classes).double()
    nat_wrong = ~correct_clean.bool().cpu()
    rob_wrong = nat_wrong | ~correct_adv.bool().cpu()   # Eq. (47)
    nat, rob = (torch.where(n > 0, torch.bincount(y, weights=w.double(), minlength=num_classes) / n.clamp_min(1),
                            torch.full_like(n, float("nan"))) for w in (nat_wrong, rob_wrong))
    ok = n > 0
    out = {"nat": nat, "rob": rob}
    for k, v in (("nat", nat[ok]), ("bdy", (rob - nat)[ok]), ("rob", rob[ok])):   # Eqs. (45)-(48)
        out.update({f"avg_{k}": v.mean().item(), f"worst_{k}": v.max().item()})
    return out
# ==== END SHARED: caat-classwise ====


# ==== BEGIN SHARED: caat-metrics (canonical: caat_meta.py; copies: caat_reinforce.py) ====
EVAL_STEP = 2 / 255   # test / validation PGD step (as FRL's code)


def fairness_metrics(model, x_u8, y, steps_list, eps, num_classes, args):
    """Average (mean over classes) and worst-class natural, boundary and robust error, PGD-k for k in steps_list."""
    fns = {f"pgd{k}": (lambda k: lambda m, xb, yb: ATTACKS["linf"](attack_model(m, args.attack_bf16), xb, yb, eps=eps,
                                                                   steps=k, step_size=EVAL_STEP, init="uniform"))(k)
           for k in steps_list}
    res = evaluate(model, x_u8, y, fns, args.batch_size, args.seed, world(), all_gather)
    out = {}
    for name in fns:
        e = classwise_errors(y, res["correct"]["clean"], res["correct"][name], num_classes)
        out.update({"nat_err": e["nat"].float(), "nat_err_avg": e["avg_nat"], "nat_err_worst": e["worst_nat"],
                    f"{name}/rob_err": e["rob"].float(), f"{name}/rob_err_avg": e["avg_rob"],
                    f"{name}/rob_err_worst": e["worst_rob"], f"{name}/bdy_err_avg": e["avg_bdy"],
                    f"{name}/bdy_err_worst": e["worst_bdy"]})
    return out


def plain(v):
    """JSON-safe value: tensors to (nested) lists, NaN (a class or bucket with no sample) to None."""
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, list):
        return [plain(e) for e in v]
    return None if isinstance(v, float) and math.isnan(v) else v


def flat(prefix, metrics):
    return {f"{prefix}/{k}": plain(v) for k, v in metrics.items()}
# ==== END SHARED: caat-metrics ====


# ==== BEGIN SHARED: caat-run (canonical: caat_meta.py; copies: caat_reinforce.py) ====
class DirectionStats:
    """Device-side sums over an epoch and over the current log window: per class, per clean / noisy training label
    (Fig. 10), per signed bound bucket round(255 eps) * (+1 adversary, -1 anti-adversary) (Figs. 8c, 9, 13)."""
    MAX_BOUND = 16   # buckets -16..16 (/255)

    def __init__(self, num_classes, device):
        self.C, self.device = num_classes, device
        self.sums = [self.zeros(), self.zeros()]   # [epoch, current window]

    def zeros(self):
        z = lambda *shape: torch.zeros(*shape, device=self.device)   # noqa: E731
        return {"cls": z(4, self.C), "split": z(5, 2), "bucket": z(2, 2 * self.MAX_BOUND + 1), "loss": z(()),
                "steps": 0, "t0": time.time()}

    def add(self, y, noisy, alpha, eps, margin, loss):
        """alpha: (B,) adversary weight (> 0.5 counts as adversary); eps: (B,) bounds; margin: (B,) zeta_2."""
        alpha, eps = alpha.float(), eps.float()
        adv = (alpha > 0.5).float()
        ones = torch.ones_like(adv)
        k = (torch.round(255 * eps).clamp(max=self.MAX_BOUND) * (2 * adv - 1)).long() + self.MAX_BOUND
        for s in self.sums:
            s["cls"].index_add_(1, y, torch.stack([ones, adv, alpha, eps]))
            s["split"].index_add_(1, noisy.long(), torch.stack([ones, adv, alpha, eps * adv, eps * (1 - adv)]))
            s["bucket"].index_add_(1, k, torch.stack([ones, margin.float()]))
            s["loss"] += loss
            s["steps"] += 1

    def log(self, window=False):
        """The record of the epoch (or of the window, which then restarts); its .cpu() is the one host sync."""
        s = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in self.sums[window].items()}
        n, adv, alpha, eps = s["cls"]
        steps = max(s["steps"], 1)
        rec = {"train/loss": s["loss"].item() / steps, "time/step_s": (time.time() - s["t0"]) / steps,
               "caat/adv_ratio": (adv.sum() / n.sum()).item(), "caat/alpha": (alpha.sum() / n.sum()).item()}
        for j, part in enumerate(("clean", "noisy")):   # Fig. 10: anti-adversaries among noisy vs clean labels
            n_j, adv_j, alpha_j, eps_adv, eps_anti = s["split"][:, j]
            rec.update({f"caat/n_{part}": int(n_j), f"caat/adv_ratio_{part}": plain(adv_j / n_j),
                        f"caat/alpha_{part}": plain(alpha_j / n_j),
                        f"caat/bound_adv_{part}": plain(255 * eps_adv / adv_j),
                        f"caat/bound_anti_{part}": plain(255 * eps_anti / (n_j - adv_j))})
        if not window:
            rec.update({"caat/adv_ratio_class": plain(adv / n), "caat/alpha_class": plain(alpha / n),
                        "caat/bound_class": plain(255 * eps / n), "caat/bound_hist": s["bucket"][0].long().tolist(),
                        "caat/margin_by_bound": plain(s["bucket"][1] / s["bucket"][0])})
        if window:
            self.sums[1] = self.zeros()
        return rec


def start_run(args, script, key):
    """Resume or validate, seed, device, data and scenario, then the run directory (nothing is written before)."""
    init_distributed(args.device)   # torchrun: one process per GPU (README D25); plain python: rank 0 of 1
    resume = load_resume(args.resume, script, key) if args.resume else None
    if resume is not None:   # the run's settings from the checkpoint; device and testing aid from this command line
        args = argparse.Namespace(**{**resume["args"], "resume": args.resume, "device": args.device,
                                     "interrupt_at_step": args.interrupt_at_step})
    check_args(args)
    seed_everything(args.seed, args.deterministic)
    device = pick_device(args.device)
    resolve_speed_flags(args, device)   # --attack-bf16 (default: on for CUDA), --compile
    data = make_datasets(args, device)
    try:
        sc = build_scenario(args, data)
    except ValueError as e:
        sys.exit(f"{script}.py: error: {e}")
    out_dir = rank_run_dir(args, script, resuming=resume is not None)   # torchrun: rank 0's, on every rank
    print(f"run directory: {out_dir}", flush=True)
    if resume is None:
        save_checkpoint(out_dir / "corruption.pt", {**sc["saved"], "noise": args.noise if args.scenario == "noisy"
                                                    else "", "seed": args.seed})
        write_json(out_dir / "args.json", {**vars(args), "derived": {
            "steps_per_epoch": num_batches(len(sc["train_y"]), args.batch_size, args.compile),
            "train_size": len(sc["train_y"]),
            "meta_size": len(sc["meta_y"]), "class_counts": sc["class_counts"].tolist(),
            "noise_realised": sc["noisy"].float().mean().item()}, **run_info(device)})
    return args, resume, device, out_dir, data, sc


def make_classifier(args, data, device, n_train):
    """f_W (Alg. 1-2, line 1), its forward for training and attacks (torch.compile'd with --compile: the same
    parameters; f_W itself for the state_dicts and Meta-CAAT's meta step), its SGD optimiser and the per-iteration
    schedule; also the number of iterations."""
    model = place_model(build_model(data["num_classes"], data["mean"], data["std"], args.width, args.activation),
                        device)
    if args.init_ckpt:
        load_weights(model, args.init_ckpt)
    opt = make_sgd(model.parameters(), device, args.lr, args.momentum, args.weight_decay)
    total = max(args.epochs * num_batches(n_train, args.batch_size, args.compile), 1)   # piecewise: x0.1 at 50%, 75%
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if args.schedule == "constant" or s < 0.5 * total
                                              else (0.1 if s < 0.75 * total else 0.01))
    return model, torch.compile(model) if args.compile else model, opt, sched, total


def new_state():
    return {"epoch": 0, "step": 0, "results": {}, "time_s": 0.0}


def restore_run(resume, nets, fair, ctx, state, out_dir, *generators):
    """--resume: networks, optimisers, multipliers, the zeta_6 EMA, counters and RNGs exactly as saved."""
    for k, obj in nets.items():
        obj.load_state_dict(resume[k])
    fair.load_state_dict(resume["fairness"])
    ctx["class_loss"] = resume["class_loss"].to(ctx["class_loss"].device)
    state.update({k: resume[k] for k in state})
    restore_rank_rng(resume["rng"], *generators)
    truncate_log(out_dir / "log.jsonl", state["step"])


def eval_metrics(model, data, args):
    x, y = data["test_x"][: args.eval_examples], data["test_y"][: args.eval_examples]
    return fairness_metrics(model, x, y, [int(s) for s in args.eval_pgd_steps.split(",")], args.eps,
                            data["num_classes"], args)


def evaluate_initial(model, data, state, args, out_dir):
    """--init-ckpt: the starting model is epoch 0 of the log."""
    state["results"]["initial"] = eval_metrics(model, data, args)
    append_jsonl(out_dir / "log.jsonl", {"kind": "epoch", "epoch": 0, "step": 0,
                                         **flat("test", state["results"]["initial"])})


def num(v):
    return "-" if v is None else f"{v:.2f}"


def epoch_batches(sc, data, args, generator, state, stats, out_dir, total):
    """One epoch of (x, y, noisy) training batches. After each one: step count, --log-every window record and
    progress line, the testing aid --interrupt-at-step, and --max-steps."""
    index = torch.arange(len(sc["train_y"]), device=sc["train_y"].device)
    t_window, first = time.time(), state["step"]
    for x, idx in iterate_batches(sc["train_x"], index, args.batch_size, generator, augment=data["augment"],
                                  drop_last=args.compile):   # --compile: one batch shape (no recompilation)
        yield x, sc["train_y"][idx], sc["noisy"][idx]
        state["step"] += 1
        if args.log_every and state["step"] % args.log_every == 0:
            rec = stats.log(window=True)
            append_jsonl(out_dir / "log.jsonl", {"kind": "window", "epoch": state["epoch"] + 1, "step": state["step"],
                                                 **rec})
            rate = (time.time() - t_window) / (state["step"] - first)
            print(f"  step {state['step']}/{total} | {rate:.2f} s/step | ETA {(total - state['step']) * rate / 60:.1f}"
                  f" min | loss {rec['train/loss']:.3f} | adv ratio {rec['caat/adv_ratio']:.2f} (clean "
                  f"{num(rec['caat/adv_ratio_clean'])}, noisy {num(rec['caat/adv_ratio_noisy'])})", flush=True)
        if args.interrupt_at_step and state["step"] == args.interrupt_at_step:
            print(f"--interrupt-at-step {args.interrupt_at_step}: simulated crash", flush=True)
            sys.exit(3)
        if args.max_steps and state["step"] >= args.max_steps:
            return


def end_epoch(model, data, state, rec, epoch, t_epoch, t_start, args, out_dir, nets, fair, ctx, generators, summary):
    """Evaluate (every --eval-every epochs and at the end), print, log, checkpoint. Returns True after the last."""
    last = epoch + 1 == args.epochs or bool(args.max_steps and state["step"] >= args.max_steps)
    sync_buffers(model)   # torchrun: one model on every rank before it is evaluated and saved
    check_ranks_agree(*(v for v in nets.values() if isinstance(v, nn.Module)))
    rec = {"kind": "epoch", "epoch": epoch + 1, "step": state["step"], **rec}
    if (epoch + 1) % args.eval_every == 0 or last:
        state["results"]["final"] = eval_metrics(model, data, args)
        rec.update(flat("test", state["results"]["final"]))
        k = f"test/pgd{args.eval_pgd_steps.split(',')[0].strip()}"
        print(f"epoch {epoch + 1}/{args.epochs} | lr {rec['lr']:.4f} | loss {rec['train/loss']:.3f} | {summary} | "
              f"nat err {rec['test/nat_err_avg']:.3f}/{rec['test/nat_err_worst']:.3f} | rob err "
              f"{rec[k + '/rob_err_avg']:.3f}/{rec[k + '/rob_err_worst']:.3f} | {time.time() - t_epoch:.1f}s",
              flush=True)
    rec["time/epoch_s"] = time.time() - t_epoch
    append_jsonl(out_dir / "log.jsonl", rec)
    state.update(epoch=args.epochs if last else epoch + 1, time_s=time.time() - t_start)
    save_checkpoint(out_dir / "ckpt.pt", {
        "format": 1, **{k: v.state_dict() for k, v in nets.items()}, "fairness": fair.state_dict(),
        "class_loss": ctx["class_loss"].cpu(), "rng": capture_rank_rng(*generators), "args": vars(args), **state,
        **model_meta(args, data)})
    return last


def gather_batch(*tensors):
    """torchrun: every rank's per-sample tensors of the step, concatenated in rank order (= the global batch's order,
    local_part slices it contiguously); the tensors themselves in one process."""
    if world()[1] == 1:
        return tensors
    parts = all_gather([t.cpu() for t in tensors])
    return tuple(torch.cat([p[i] for p in parts]).to(t.device) for i, t in enumerate(tensors))


def model_meta(args, data):
    return {"arch": "preact_resnet18", "width": args.width, "activation": args.activation,
            "num_classes": data["num_classes"], "dataset": args.dataset, "mean": list(data["mean"]),
            "std": list(data["std"]), "method": method_name(args)}


def finish(model, data, state, args, out_dir, t_start):
    """model.pt and results.json (the starting and the final model's class-wise metrics)."""
    wall = time.time() - t_start
    save_checkpoint(out_dir / "model.pt", {"format": 1, "model": model.state_dict(), "args": vars(args),
                                           **model_meta(args, data)})
    results = {k: {m: plain(v) for m, v in r.items()} for k, r in state["results"].items()}
    results.update({"method": method_name(args), "scenario": args.scenario, "steps": state["step"],
                    "time/total_s": wall, "eval_examples": min(args.eval_examples, len(data["test_y"]))})
    write_json(out_dir / "results.json", results)
    print(f"done in {wall:.1f}s: {out_dir / 'results.json'}", flush=True)
    return results
# ==== END SHARED: caat-run ====


# ==== BEGIN SHARED: common-flags (canonical: cas.py; copies: caat_meta.py, caat_reinforce.py) ====
def fraction(s: str) -> float:
    """argparse type that accepts fractions: --eps 8/255."""
    try:
        return float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {s!r}")


def add_common_flags(parser):
    g = parser.add_argument_group("common")
    g.add_argument("--dataset", type=str, default="cifar10", choices=("cifar10", "cifar100", "svhn", "fake"),
                   help="fake: seeded synthetic 32x32 images for tests (no files needed)")
    g.add_argument("--data-dir", type=str, default="./data", help="where the dataset files are (or are downloaded to)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download missing dataset files (md5-checked archives)")
    g.add_argument("--train-subset", type=int, default=0, help="use the first N training images (0 = all)")
    g.add_argument("--test-subset", type=int, default=0, help="use the first N test images (0 = all)")
    g.add_argument("--out-dir", type=str, default="",
                   help="run directory (default runs/<script>/<dataset>-s<seed>-<time>)")
    g.add_argument("--epochs", type=int, default=10, help="epochs of the method")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--seed", type=int, default=0, help="one seed drives everything")
    g.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="deterministic algorithms; on CUDA, ops without one warn and stay nondeterministic (README)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast for the training forward/backward (the attacks: --attack-bf16)")
    g.add_argument("--attack-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the model's forward inside the attacks (float32 logits; their renderers, "
                        "projections and the accuracy counts stay fp32); default: on for CUDA, off for CPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model's forward (training and attacks); training then drops each epoch's "
                        "last partial batch, so that the batch shape never changes (no recompilation)")
    g.add_argument("--resume", type=str, default="", help="run directory or ckpt.pt of the SAME run to continue")
    g.add_argument("--init-ckpt", type=str, default="", help="weights to start from (model.pt or a plain state_dict)")
    g.add_argument("--max-steps", type=int, default=0, help="stop each stage after N optimizer steps (0 = no limit)")
    g.add_argument("--interrupt-at-step", type=int, default=0,
                   help="testing aid: exit with status 3 right after optimizer step N, as if killed")
    g.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations on the test subset")
    g.add_argument("--eval-examples", type=int, default=1000, help="first N test images for per-epoch robust accuracy")
    g.add_argument("--attacks", type=str, default="", help="comma list of attacks.ATTACKS names (default: all 21)")
    g.add_argument("--attack-steps", type=int, default=10, help="inner steps of every training-time attack")
    g.add_argument("--width", type=int, default=64, help="base width of PreActResNet-18 (64 = the paper; tests use 8)")
    g.add_argument("--activation", type=str, default="relu", choices=("relu", "softplus"),
                   help="block activation (softplus: E-AT's released weights)")
    g.add_argument("--input-norm", type=str, default="dataset", choices=("dataset", "none"),
                   help="mean/std inside the model: the dataset's, or none (E-AT's weights expect raw [0,1] input)")
    return parser


def check_common_args(args):
    """Values outside a common flag's meaning, unreadable files, a taken run directory: ValueError, before any work."""
    if args.resume:   # a resumed run takes its settings from its checkpoint (each script's load_resume reads it)
        path = Path(args.resume) / "ckpt.pt" if Path(args.resume).is_dir() else Path(args.resume)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return
    for flag, low in (("batch_size", 1), ("epochs", 0), ("eval_every", 1), ("eval_examples", 1), ("width", 1),
                      ("attack_steps", 1), ("max_steps", 0), ("train_subset", 0), ("test_subset", 0)):
        if getattr(args, flag) < low:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= {low}")
    if not (args.lr > 0 and 0 <= args.momentum < 1 and args.weight_decay >= 0):
        raise ValueError(f"need --lr > 0, 0 <= --momentum < 1, --weight-decay >= 0; got {args.lr}, {args.momentum}, "
                         f"{args.weight_decay}")
    pick_device(args.device)
    if args.attacks:
        attacks.registered(args.attacks)
    if args.out_dir and (Path(args.out_dir) / "ckpt.pt").exists():
        raise ValueError(f"--out-dir {args.out_dir} already holds a run; continue it with --resume {args.out_dir}")
    if args.dataset != "fake":
        ensure_files(args.dataset, Path(args.data_dir), args.download)
    if args.init_ckpt:                            # the weights must fit the model this run builds
        load_weights(build_model(DATASETS[args.dataset]["num_classes"], (0.0,) * 3, (1.0,) * 3, args.width,
                                 args.activation), args.init_ckpt)


def make_sgd(params, device, lr, momentum=0.0, weight_decay=0.0):
    """SGD; on CUDA the fused implementation (one kernel for all parameters, torch >= 2.4), on CPU the default."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           fused=True if device.type == "cuda" else None)


def parse_args(parser, argv, check):
    """Parse, then validate everything before anything is written: a user error is one line and exit 2."""
    args = parser.parse_args(argv)
    try:
        check_common_args(args)
        check(args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return args
# ==== END SHARED: common-flags ====


# ==== BEGIN SHARED: setup (canonical: cas.py; copies: caat_meta.py, caat_reinforce.py, eval.py) ====
def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)                      # seeds the CPU and every CUDA device
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:   # CPU runs are deterministic anyway. On CUDA, ops without a deterministic kernel (grid_sample,
        # interpolate and reflection-pad backward in some attacks) warn instead of raising: README, "Reproducibility"
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def resolve_speed_flags(args, device):
    """--attack-bf16 unset (None, or a run from before the flag): on for CUDA, off for CPU; --compile: off unless
    given. args.json / eval.json record the resolved values."""
    args.attack_bf16 = device.type == "cuda" if getattr(args, "attack_bf16", None) is None else args.attack_bf16
    args.compile = bool(getattr(args, "compile", False))
    return args
# ==== END SHARED: setup ====


# ==== BEGIN SHARED: distributed (canonical: cas.py; copies: caat_meta.py, caat_reinforce.py, eval.py) ====
# Data parallelism under torchrun (README, "Several GPUs"): every rank runs the same script on its own slice of each
# global batch. A plain `python script.py` is rank 0 of 1, and every function below is then a no-op.
def init_distributed(device_name: str):
    """Under torchrun (WORLD_SIZE > 1): join the process group -- NCCL with this process's GPU (LOCAL_RANK) on CUDA,
    gloo on CPU -- and silence the other ranks' stdout (rank 0 prints). Returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.device(device_name).type == "cuda" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")   # errors still reach stderr
    return dist.get_rank(), dist.get_world_size()


def end_distributed():
    """After a successful run: leave the process group together (a barrier first: a rank tearing its connections
    down while another still holds them aborts with "terminate called without an active exception")."""
    if world()[1] > 1:
        dist.barrier()
        dist.destroy_process_group()


def world():
    """(rank, world size): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out
# ==== END SHARED: distributed ====


# ==== BEGIN SHARED: data-parallel (canonical: cas.py; copies: caat_meta.py, caat_reinforce.py) ====
def local_part(t):
    """This rank's slice of a global batch (contiguous, sizes differ by at most one)."""
    rank, size = world()
    return t if size == 1 else t.tensor_split(size)[rank]


def all_sum(t):
    """t summed over the ranks, in place (every rank gets the same bits)."""
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def sum_into(tensors, scale=1.0):
    """Each tensor replaced, in place, by scale * its sum over the ranks (one all-reduce of a flat buffer)."""
    flat = all_sum(torch.cat([t.flatten() for t in tensors]) * scale)
    for t, v in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(v.view_as(t))


def sync_gradients(params, weight=1.0):
    """The global batch's gradient on every rank: sum over the ranks of weight * grad, in one all-reduce (weight
    n_r / N when each rank's loss is its slice's mean, 1 when it is its share of the global loss). Used instead of
    DistributedDataParallel, whose reducer would take the attacks' input-gradient passes through the same model
    (between training steps, in eval mode) for an unfinished backward."""
    if world()[1] == 1:
        return
    sum_into([p.grad for p in params if p.grad is not None], weight)


def rank_run_dir(args, script, resuming):
    """The run directory on every rank: rank 0 creates it (make_run_dir, timestamped by default) and shares its path.
    Also checks that the global batch covers the ranks and gives ranks > 0 their own stream for the attacks' random
    starts (the networks are made equal by broadcast_modules)."""
    rank, size = world()
    if args.batch_size < size:
        sys.exit(f"{script}.py: error: --batch-size {args.batch_size} (the global batch) is smaller than the {size} "
                 f"ranks")
    args.out_dir = all_gather(str(make_run_dir(args, script, resuming)) if rank == 0 else None)[0]
    if rank:
        torch.manual_seed(args.seed + rank)
    return Path(args.out_dir)


def capture_rank_rng(*generators):
    """capture_rng of this process; under torchrun every rank's, as {"ranks": [...]} (rank 0 saves them all)."""
    return capture_rng(*generators) if world()[1] == 1 else {"ranks": all_gather(capture_rng(*generators))}


def restore_rank_rng(rng, *generators):
    """restore_rng with this rank's states from a capture_rank_rng; a run resumes with as many ranks as it had."""
    saved = len(rng.get("ranks", [rng]))
    if saved != world()[1]:
        sys.exit(f"--resume: the run had {saved} process(es), this one {world()[1]}; resume with as many")
    restore_rng(rng["ranks"][world()[0]] if "ranks" in rng else rng, *generators)


def broadcast_modules(*modules):
    """Rank 0's parameters and buffers on every rank: the common starting point of data-parallel training."""
    if world()[1] > 1:
        for m in modules:
            for t in m.state_dict().values():
                dist.broadcast(t, 0)


def check_ranks_agree(*states):
    """Every rank must hold the same model (and sampler, ...): modules are compared by checksum, other states as they
    are, at every checkpoint; a difference is a bug, reported rather than saved."""
    if world()[1] == 1:
        return
    mine = [[float(t.double().sum()) for t in s.state_dict().values() if t.is_floating_point()]
            if isinstance(s, nn.Module) else s for s in states]
    if any(other != mine for other in all_gather(mine)):
        raise RuntimeError("the ranks hold different models or sampler states (a data-parallel bug)")


def sync_buffers(model):
    """Average the batch-norm running statistics over the ranks, so that every rank holds one model. Each rank
    normalises with its own slice's batch statistics (DDP's default, no SyncBatchNorm); called before every
    evaluation and checkpoint."""
    if world()[1] == 1:
        return
    sum_into([b for b in model.buffers() if b.is_floating_point()], 1 / world()[1])
# ==== END SHARED: data-parallel ====


# ==== BEGIN SHARED: run-dir (canonical: cas.py; copies: caat_meta.py, caat_reinforce.py) ====
def make_run_dir(args, script: str, resuming: bool = False) -> Path:
    """Create (or, when resuming, reuse) the run directory; never overwrite another run's files."""
    if not args.out_dir:
        args.out_dir = str(Path("runs") / script / f"{args.dataset}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(args.out_dir)
    if not resuming and (out / "ckpt.pt").exists():
        raise FileExistsError(f"{out} already holds a run (ckpt.pt); continue it with --resume {out}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_info(device: torch.device) -> dict:
    """Versions, machine and commit recorded in args.json."""
    import subprocess
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    return {"python": sys.version.split()[0], "torch": torch.__version__, "git": git,
            "start_time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def append_jsonl(path, record):
    if not writes_here():
        return
    with open(path, "a") as f:
        f.write(json.dumps(strict_json(record), sort_keys=True, allow_nan=False) + "\n")


def save_checkpoint(path, obj):
    """Atomic torch.save: write path.tmp, then os.replace (a kill at any moment leaves the old or the new file).
    Under torchrun only rank 0 writes."""
    if not writes_here():
        return
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_resume(path, script, key):
    """The ckpt.pt of a run of `script` (given as its run directory or the file), holding `key`; resume with it."""
    path = Path(path) / "ckpt.pt" if Path(path).is_dir() else Path(path)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or key not in ckpt or "args" not in ckpt:
        raise ValueError(f"--resume {path}: not a ckpt.pt written by {script}.py")
    ckpt["args"]["out_dir"] = str(path.parent)
    return ckpt


def capture_rng(*generators):
    """torch's global RNG (CPU and every CUDA device) and the given generators' states: an exact resume."""
    rng = {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng, *generators):
    torch.set_rng_state(rng["torch"])
    for g, state in zip(generators, rng["generators"]):
        g.set_state(state)
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def truncate_log(path, step, keep=None):
    """On resume, keep only the log lines up to the checkpoint's step, and at most the first `keep` (the lines the
    checkpoint had seen: a line written after it at the same step is written again); later ones come again,
    identically."""
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        write_text(path, "".join(l + "\n" for l in lines[:keep]))
# ==== END SHARED: run-dir ====


# ==== BEGIN SHARED: model (canonical: cas.py; copies: caat_meta.py, caat_reinforce.py, eval.py) ====
class Normalize(nn.Module):
    """(x - mean) / std with non-persistent buffers: no state_dict entries, so published weights load as they are."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016) as in Rice et al. 2020 / E-AT: bn1-act-conv1-bn2-act-conv2 + skip;
    the projection shortcut (1x1 conv, when the shape changes) takes the activated input, the identity the raw one."""

    def __init__(self, in_planes, planes, stride, act):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(in_planes), nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.act = act
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = self.act(self.bn1(x))
        skip = self.shortcut(out) if hasattr(self, "shortcut") else x
        return self.conv2(self.act(self.bn2(self.conv1(out)))) + skip


class PreActResNet18(nn.Module):
    """PreActResNet-18 with the layer names of Rice et al. / E-AT (conv1, layer1..4, bn, linear); input in [0, 1].

    Final bn -> ReLU -> average pool -> linear (ReLU even with softplus blocks, as E-AT). width 64 = the standard model.
    """

    def __init__(self, num_classes=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), width=64, activation="relu"):
        super().__init__()
        act = nn.ReLU() if activation == "relu" else nn.Softplus(beta=1.0)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        planes, layers = width, []
        for i, stride in enumerate((1, 2, 2, 2)):
            layers.append(nn.Sequential(PreActBlock(planes, width * 2 ** i, stride, act),
                                        PreActBlock(width * 2 ** i, width * 2 ** i, 1, act)))
            planes = width * 2 ** i
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn, self.linear = nn.BatchNorm2d(planes), nn.Linear(planes, num_classes)

    def features(self, x):
        """Outputs of layer1..layer4 (pre-activation sums), for ppgd's "self" perceptual distance."""
        out, feats = self.conv1(self.normalize(x)), []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = layer(out)
            feats.append(out)
        return feats

    def forward(self, x):
        out = F.relu(self.bn(self.features(x)[-1]))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def build_model(num_classes, mean, std, width=64, activation="relu"):
    return PreActResNet18(num_classes, mean, std, width, activation)


def place_model(model, device):
    """The model on `device`; on CUDA in channels_last (cuDNN's fast convolution layout; CPU: unchanged)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else model


class AttackModel(nn.Module):
    """--attack-bf16: what the attacks get instead of the model: its forward under bf16 autocast, float32 logits out
    (the attacks' losses, renderers and projections stay fp32). .features, the feature maps of ppgd's perceptual
    distance (its projection and eval.py's budget check measure it), are the model's own, fp32. The mode is the
    wrapped model's: the caller sets it (attacks never change it); .train() / .eval() on the wrapper reach it too."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.features = attacks.perceptual.feature_fn(model, "self")   # model.features, else forward hooks

    @property
    def training(self):
        return self.model.training if "model" in self._modules else True

    @training.setter
    def training(self, mode):   # written by nn.Module.__init__ and .train(), which also sets the wrapped model
        pass

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x).float()


def attack_model(model, bf16):
    """The model as the attacks see it: AttackModel(model) with --attack-bf16, else the model itself."""
    return AttackModel(model) if bf16 else model


def extract_state_dict(obj, path):
    """The state_dict inside a checkpoint: ours ({"model": ...}), Rice et al.'s ({"state_dict": ...}) or a plain one."""
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state_dict (expected a dict of tensors, or a checkpoint with a 'model' "
                         f"or 'state_dict' entry); got {type(obj).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_weights(model, path):
    """Load a checkpoint's weights into `model` strictly; one error line for missing, unexpected, mis-shaped keys."""
    sd = extract_state_dict(load_checkpoint(path), path)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not fit this PreActResNet-18 (check --width/--activation/--dataset): "
                         f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, "
                         f"shape mismatches (checkpoint vs model) {shapes[:3]}")
    model.load_state_dict(sd)
    return model
# ==== END SHARED: model ====


# ==== BEGIN SHARED: data (canonical: cas.py; copies: caat_meta.py, caat_reinforce.py, eval.py) ====
# name -> classes, mean, std, augmentation, files (relative to --data-dir), (url, md5) to download them
DATASETS = {
    "cifar10": dict(num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616), augment="crop_flip",
                    files=[f"cifar-10-batches-py/{f}" for f in ("data_batch_1", "data_batch_2", "data_batch_3",
                                                                "data_batch_4", "data_batch_5", "test_batch")],
                    urls=[("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                           "c58f30108f718f92721af3b95e74349a")]),
    "cifar100": dict(num_classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), augment="crop_flip",
                     files=["cifar-100-python/train", "cifar-100-python/test"],
                     urls=[("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                            "eb9058c3a382ffc7106e4002c42a8d85")]),
    "svhn": dict(num_classes=10, mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), augment="crop",
                 files=["train_32x32.mat", "test_32x32.mat"],
                 urls=[("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d0373"),
                       ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")]),
    "fake": dict(num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augment="crop_flip", files=[], urls=[]),
}
FAKE_SIZES = (256, 64)   # train / test images of --dataset fake


def ensure_files(name, root, download):
    """Make sure the dataset files exist under root; download them if allowed, else a clear FileNotFoundError."""
    ds = DATASETS[name]
    missing = [f for f in ds["files"] if not (root / f).exists()]
    if missing and download:
        try:
            from torchvision.datasets.utils import download_and_extract_archive, download_url
            for url, md5 in ds["urls"]:
                (download_and_extract_archive if url.endswith(".tar.gz") else download_url)(url, str(root), md5=md5)
        except Exception as e:   # offline, proxy, disk: name the files the user must provide
            raise FileNotFoundError(f"{name}: could not download ({type(e).__name__}: {e}); put "
                                    f"{', '.join(ds['files'])} under --data-dir {root}") from e
        missing = [f for f in ds["files"] if not (root / f).exists()]
    if missing:
        raise FileNotFoundError(f"{name}: missing {', '.join(missing)} under --data-dir {root}; download them from "
                                f"{', '.join(u for u, _ in ds['urls'])} (or drop --no-download)")


def read_split(name, root, train):
    """(uint8 images (N, 3, 32, 32), int64 labels (N,)) from the standard files (no md5 check of the files)."""
    import pickle
    if name == "svhn":   # X (32, 32, 3, N), y (N, 1) with label 10 for the digit 0
        from scipy.io import loadmat
        d = loadmat(str(root / ("train_32x32.mat" if train else "test_32x32.mat")))
        return (torch.from_numpy(np.ascontiguousarray(d["X"].transpose(3, 2, 0, 1))),
                torch.from_numpy(d["y"].astype(np.int64).reshape(-1) % 10))
    files = [f for f in DATASETS[name]["files"] if ("test" not in f) == train]
    xs, ys = [], []
    for f in files:
        with open(root / f, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[b"labels"] if b"labels" in d else d[b"fine_labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def fake_split(n, seed, num_classes=10):
    """Seeded synthetic images: a per-class colour and stripe frequency shared by every split, plus per-image noise."""
    proto = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(1234)) * 0.6 + 0.2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    stripes = torch.sin(torch.arange(32.0) * (y.float()[:, None] + 1) * 0.4)[:, None, None, :] * 0.15
    x = proto[y] + stripes + 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def make_datasets(args, device):
    """Whole train/test sets as uint8 tensors on `device` (augmentation happens batched on the device)."""
    ds = DATASETS[args.dataset]
    if args.dataset == "fake":
        (tx, ty), (vx, vy) = fake_split(FAKE_SIZES[0], 0), fake_split(FAKE_SIZES[1], 1)
    else:
        ensure_files(args.dataset, Path(args.data_dir), args.download)
        (tx, ty), (vx, vy) = (read_split(args.dataset, Path(args.data_dir), t) for t in (True, False))
    tx, ty = (tx[: args.train_subset], ty[: args.train_subset]) if args.train_subset else (tx, ty)
    vx, vy = (vx[: args.test_subset], vy[: args.test_subset]) if args.test_subset else (vx, vy)
    mean, std = (ds["mean"], ds["std"]) if args.input_norm == "dataset" else ((0.0,) * 3, (1.0,) * 3)
    return {"train_x": tx.to(device), "train_y": ty.to(device), "test_x": vx.to(device), "test_y": vy.to(device),
            "num_classes": ds["num_classes"], "mean": mean, "std": std, "augment": ds["augment"]}


def to_float(x_u8):
    return x_u8.float().div_(255.0)


def to_device(t, device):
    """A CPU tensor on `device`; to CUDA from pinned memory without blocking (no host sync in the training loop)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def augment_batch(x, generator, kind, pad=4):
    """Random crop (zero padding `pad`) and, for kind 'crop_flip', horizontal flip, batched on x's device; the random
    numbers come from the CPU `generator` (checkpointed: an exact resume), copied to the device without a sync."""
    b, c, h, w = x.shape
    offs = to_device(torch.randint(0, 2 * pad + 1, (2, b), generator=generator), x.device)
    flip = to_device(torch.rand(b, generator=generator), x.device) < 0.5
    rows = (offs[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]   # (B, 1, H, 1)
    cols = offs[1][:, None] + torch.arange(w, device=x.device)                       # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols) if kind == "crop_flip" else cols
    bidx = torch.arange(b, device=x.device)[:, None, None, None]
    cidx = torch.arange(c, device=x.device)[None, :, None, None]
    return F.pad(x, (pad,) * 4)[bidx, cidx, rows, cols[:, None, None, :]]


def num_batches(n, batch_size, drop_last=False):
    """Batches in a pass over n images; drop_last (training with --compile: one batch shape, no recompilation) drops
    the last partial batch unless it is the only one. Evaluation keeps it (compiled: one recompilation for it)."""
    return max(n // batch_size, 1) if drop_last else math.ceil(n / batch_size)


def iterate_batches(x_u8, y, batch_size, generator=None, augment=None, drop_last=False):
    """Yield float [0,1] batches; shuffled and augmented when a generator is given, else in order."""
    n = len(y)
    order = to_device(torch.randperm(n, generator=generator), y.device) if generator is not None else \
        torch.arange(n, device=y.device)
    for i in range(0, num_batches(n, batch_size, drop_last) * batch_size, batch_size):
        idx = order[i: i + batch_size]
        xb = to_float(x_u8[idx])
        yield (augment_batch(xb, generator, augment) if generator is not None and augment else xb), y[idx]
# ==== END SHARED: data ====


# ==== BEGIN SHARED: evaluate (canonical: cas.py; copies: caat_meta.py, caat_reinforce.py, eval.py) ====
def evaluate(model, x_u8, y, attack_fns, batch_size, seed, part=(0, 1), gather=None):
    """Clean accuracy and accuracy under each attack (dict name -> fn(model, x, y) -> x_adv) on (x_u8, y).

    Eval mode throughout (the mode is restored after). The RNG is forked and re-seeded from (seed, batch index)
    before each batch of each attack, so a result depends neither on the training RNG, nor on which other attacks
    ran, nor on which process attacked which batch. part = (rank, ranks): this process takes batches rank,
    rank + ranks, ...; gather(obj) -> [obj of every rank] (torchrun) merges them, so every rank gets the results of
    one process. Also returns per-example correctness.
    """
    was_training = model.training
    model.eval()
    devices = [y.device.index or 0] if y.device.type == "cuda" else []
    correct = {}
    for name, fn in {"clean": None, **attack_fns}.items():
        hits = {}
        for i, (xb, yb) in enumerate(iterate_batches(x_u8, y, batch_size)):
            if i % part[1] != part[0]:
                continue
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed + 1_000_003 * i)
                x_adv = xb if fn is None else fn(model, xb, yb)
            with torch.no_grad():
                hits[i] = model(x_adv).argmax(1) == yb
        if part[1] > 1:
            hits = {i: h.to(y.device) for d in gather({i: h.cpu() for i, h in hits.items()}) for i, h in d.items()}
        correct[name] = torch.cat([hits[i] for i in sorted(hits)])
    model.train(was_training)
    acc = {k: v.float().mean().item() for k, v in correct.items()}
    return {"clean": acc.pop("clean"), "attacks": acc, "correct": correct}
# ==== END SHARED: evaluate ====


# ==== BEGIN SHARED: io (canonical: cas.py; copies: caat_meta.py, caat_reinforce.py, eval.py) ====
def write_text(path, text):
    """Atomic write (temp file + os.replace): a crash never leaves a half-written file. Under torchrun only rank 0
    writes."""
    if not writes_here():
        return
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def writes_here():
    """False on torchrun's ranks other than 0 (RANK is torchrun's variable): only rank 0 writes files."""
    return os.environ.get("RANK", "0") == "0"


def strict_json(obj):
    """obj with NaN / inf floats as None: strict JSON readers (jq, JavaScript) reject NaN, and it reads as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    return [strict_json(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def write_json(path, obj):
    write_text(path, json.dumps(strict_json(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


def load_checkpoint(path):
    """torch.load with weights_only=True (no arbitrary pickles), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # UnpicklingError for non-weights pickles, RuntimeError for non-torch files
        raise ValueError(f"{path} is not a plain weights checkpoint readable with torch.load(weights_only=True) "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
# ==== END SHARED: io ====


if __name__ == "__main__":   # at the very end, so the shared blocks above are defined before main() runs
    main(get_args())
