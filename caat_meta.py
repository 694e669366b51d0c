"""Meta-CAAT -- Combining Adversaries and Anti-adversaries in Training (Zhou, Wu, Yang), reference implementation.

Each training sample is perturbed either adversarially (TRADES boundary loss) or anti-adversarially (descend its
CE), with a per-sample bound (grad-based Eq. 26 or FRL's class-wise ReMargin). A weighting network f_Omega maps six
training characteristics (Eqs. 20-24) to the soft direction weights (alpha_x, beta_x) of Eq. (25); Omega is learned
online on a clean meta set with the one-step look-ahead of Eqs. (27)-(29) (Algorithm 1), under FRL's fairness
constraints (Eq. 19). The baselines of the paper's tables run in the same harness (--method). Comments "Eq. (k)" and
"Alg. 1, line n" refer to the CAAT paper; the choices it leaves open are in README.md#caat_metapy. Upstream code
cited in comments: FRL (Xu et al. 2021; frlrw.py, frlrmrw.py) https://github.com/hannxu123/fair_robust, TRADES
https://github.com/yaodongyu/TRADES, Meta-Weight-Net https://github.com/xjtushujun/meta-weight-net.

    python caat_meta.py --dataset cifar10 --init-ckpt hot_start.pt --lr 0.001 --epochs 40    # FRL protocol
    python caat_meta.py --dataset cifar10 --scenario noisy --noise pairflip --noise-rate 0.2  # from scratch
    python caat_meta.py --method trades --lam 6                                               # a baseline
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
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import attacks
from attacks import ATTACKS
from attacks.lp import TRADES_INIT_STD

SCRIPT = "caat_meta"
METHODS = ("meta-caat", "pgd-at", "trades", "frl-reweight", "frl-remargin", "frl-both", "baseline-reweight")
SETTINGS = ("IV", "I", "II", "III", "without")   # Sec. 6.5 ablations; IV = full Meta-CAAT
REMARGIN_CLAMP = (0.98, 3.0)   # FRL frlrmrw.py: eps_c = eps * clamp(exp(2 phi_m), 0.98, 3)
FRL_HALVE_EVERY = 40           # FRL halves its multiplier rate every 40 epochs (FRL's code)
EVAL_STEP = 2 / 255            # test / validation PGD step (as FRL's code)


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_flags(parser)
    parser.set_defaults(epochs=100, lr=0.1)   # default: from scratch, 100 epochs, lr 0.1 (x0.1 at 50%, 75%)
    g = parser.add_argument_group("CAAT (Alg. 1)")
    g.add_argument("--method", type=str, default="meta-caat", choices=METHODS)
    g.add_argument("--setting", type=str, default="IV", choices=SETTINGS,
                   help="Sec. 6.5: I same direction+bound, II same direction/varied bound, III both directions/"
                        "same bound, IV both + varied (full), without: tail adversarial, head anti, fixed bound")
    g.add_argument("--drop-characteristic", type=str, default="",
                   help="comma list of zeta indices 1..6 to zero (Fig. 15)")
    g.add_argument("--scenario", type=str, default="standard", choices=("standard", "noisy", "longtail"))
    g.add_argument("--noise", type=str, default="uniform", choices=("uniform", "pairflip"), help="Sec. 6.3")
    g.add_argument("--noise-rate", type=float, default=0.2, help="r: fraction of training labels resampled")
    g.add_argument("--imbalance", type=float, default=10.0, help="IF of the long-tailed profile (Cui et al.)")
    g.add_argument("--meta-per-class", type=int, default=0,
                   help="clean validation/meta images per class (0 = 300, FRL/CAAT; 5 for --dataset fake)")
    g.add_argument("--eps", type=fraction, default=8 / 255, help="predefined bound epsilon (Sec. 6.1)")
    g.add_argument("--lam", "--beta", dest="lam", type=fraction, default=1.5,
                   help="lambda of Eq. (25) (= TRADES/FRL beta; CAAT grid {2/3, 1, 1.5, 6})")
    g.add_argument("--bound", type=str, default="grad", choices=("grad", "remargin"), help="Eq. (26) or ReMargin")
    g.add_argument("--bound-offset", type=float, default=0.9, help="varepsilon of Eq. (26)")
    g.add_argument("--tau", type=float, default=0.1, help="tau of the tau-softmax of f_Omega (Sec. 4.3)")
    g.add_argument("--hidden", type=int, default=100, help="hidden width of f_Omega")
    g.add_argument("--meta-lr", type=float, default=1e-3, help="eta_2: Adam lr of Omega (Eq. 28)")
    g.add_argument("--meta-weight-decay", type=float, default=1e-4)
    g.add_argument("--meta-batch-size", type=int, default=128, help="m of Alg. 1")
    g.add_argument("--fairness", action=argparse.BooleanOptionalAction, default=True,
                   help="FRL ReWeight constraints of Eq. (25) in meta-caat")
    g.add_argument("--tau1", type=float, default=0.05, help="natural-error slack of Eq. (19)")
    g.add_argument("--tau2", type=float, default=0.05, help="boundary-error slack of Eq. (19)")
    g.add_argument("--frl-rate", type=float, default=0.05, help="multiplier step (boundary: 2x), halved every 40 ep.")
    g.add_argument("--frl-limit", type=float, default=0.5, help="cap on the sum of each multiplier vector")
    g.add_argument("--remargin-rate", type=float, default=0.2, help="ReMargin multiplier step")
    g.add_argument("--val-attack-steps", type=int, default=20, help="PGD steps on the validation split (FRL)")
    g.add_argument("--schedule", type=str, default="piecewise", choices=("piecewise", "constant"),
                   help="lr x0.1 at 50%% and x0.01 at 75%% of the iterations, or constant (FRL's fine-tuning)")
    # DEVIATION: per-epoch test metrics with PGD-10 and PGD-20 (FRL's eval), not the paper's PGD-100 -- cost;
    # --eval-pgd-steps 10,100 gives the paper's pair
    g.add_argument("--eval-pgd-steps", type=str, default="10,20", help="PGD steps of the per-epoch test metrics")
    return parser


def get_args(argv=None):
    return parse_args(make_parser(), argv, check_args)


# ----------------------------------------------------------------------------------------------------------------
# Sec. 4.2 and 4.3.1: characteristics and bound (shared with caat_reinforce.py)
# ----------------------------------------------------------------------------------------------------------------

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
    n = torch.bincount(y, minlength=class_loss.numel()).to(class_loss.dtype)
    total = torch.zeros_like(class_loss).index_add_(0, y, losses.to(class_loss.dtype))
    return torch.where(n > 0, momentum * class_loss + (1 - momentum) * total / n.clamp_min(1), class_loss)
# ==== END SHARED: caat-characteristics ====


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
    g_adv_bar = g_adv / g_adv.max().clamp_min(1e-12)     # "normalized" in Eq. (26): our reading
    g_anti_bar = g_anti / g_anti.max().clamp_min(1e-12)
    return (a * g_adv_bar + b * g_anti_bar + offset) * eps


# ----------------------------------------------------------------------------------------------------------------
# Data scenarios (Sec. 6.3, 6.4): meta split, label noise, long tail -- seeded and saved with the run
# ----------------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------------
# Fairness constraints (Eq. 19, solved as FRL does) and the weighting network (Sec. 4.3)
# ----------------------------------------------------------------------------------------------------------------

class Fairness:
    """FRL multipliers: phi_nat / phi_bdy (ReWeight), phi_rob (Baseline ReWeight), phi_m (ReMargin); as FRL's code."""

    def __init__(self, num_classes, args):
        self.C, self.args = num_classes, args
        self.phi = {k: torch.zeros(num_classes) for k in ("nat", "bdy", "rob", "m")}

    def update(self, nat_err, rob_err, epoch, use):
        """One projected multiplier-ascent step on the class violations measured on the validation split."""
        a, rate = self.args, self.args.frl_rate * 0.5 ** (epoch // FRL_HALVE_EVERY)
        bdy_err = rob_err - nat_err
        viol = {"nat": nat_err - nat_err.mean() - a.tau1, "bdy": bdy_err - bdy_err.mean() - a.tau2,
                "rob": rob_err - rob_err.mean() - a.tau1}
        for k, step in (("nat", rate), ("bdy", 2 * rate), ("rob", rate)):   # boundary: twice the rate (FRL)
            if k in use:
                phi = (self.phi[k] + step * viol[k]).clamp_min(0)
                self.phi[k] = phi * a.frl_limit / phi.sum() if phi.sum() > a.frl_limit else phi
        if "m" in use:
            self.phi["m"] = self.phi["m"] + a.remargin_rate * viol["bdy"]   # not clipped (FRL)

    def class_weight(self, k):
        """w(c) = 1/C + phi(c) - (1/C) sum_j phi(j) (FRL's cost-sensitive Lagrangian weights), (C,)."""
        return 1.0 / self.C + self.phi[k] - self.phi[k].sum() / self.C

    def class_eps(self, eps):
        """ReMargin: eps_c = eps * clamp(exp(2 phi_m(c)), 0.98, 3), (C,)."""
        return eps * torch.exp(2 * self.phi["m"]).clamp(*REMARGIN_CLAMP)

    def state_dict(self):
        return dict(self.phi)

    def load_state_dict(self, d):
        self.phi = {k: v.clone() for k, v in d.items()}


class WeightingNet(nn.Module):
    """f_Omega: zeta (B, 6) -> MLP with one hidden layer -> Softmax((h w + b) / tau) = (alpha_x, beta_x) (Eq. 25)."""

    def __init__(self, hidden=100, tau=0.1):
        super().__init__()
        self.tau = tau
        self.net = nn.Sequential(nn.Linear(len(CHARACTERISTICS), hidden), nn.ReLU(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[2].weight)   # neutral start alpha = beta = 0.5 (our choice)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, zeta):
        return F.softmax(self.net(zeta) / self.tau, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# One iteration of Algorithm 1 (and of the baselines)
# ----------------------------------------------------------------------------------------------------------------

def perturb(model, x, y, eps, steps, direction, loss, seed):
    """K sign steps of eps_i/4 (eta_0) from x + 0.001 N(0, I) (Alg. 1, lines 5, 7-10); `seed` replays the init."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return ATTACKS["linf"](model, x, y, eps=eps, steps=steps, step_size=eps / 4, init="trades", direction=direction,
                           loss=loss, generator=gen)


def per_sample_losses(forward, x, x_adv, x_anti, y):
    """(B,) terms of Eq. (25): CE(f(x), y), KL(f(x) || f(x_adv)) (TRADES: both branches carry grad), CE(f(x_anti), y)
    (x_adv / x_anti None: that term is skipped)."""
    logits = forward(x)
    out = {"ce": F.cross_entropy(logits, y, reduction="none"), "logits": logits}
    if x_adv is not None:
        out["kl"] = F.kl_div(F.log_softmax(forward(x_adv), 1), F.softmax(logits, 1), reduction="none").sum(1)
    if x_anti is not None:
        out["anti"] = F.cross_entropy(forward(x_anti), y, reduction="none")
    return out


def weighted_loss(t, a, b, w_nat, w_bdy, lam):
    """Eq. (25)/(27) with FRL's class weights: sum a w_nat CE / sum w_nat + lam sum a w_bdy KL / sum w_bdy
    + sum b w_nat CE_anti / sum w_nat. Uniform weights give the plain batch mean of Eq. (27)."""
    loss = (a * w_nat * t["ce"]).sum() / w_nat.sum() + lam * (a * w_bdy * t["kl"]).sum() / w_bdy.sum()
    if "anti" in t:
        loss = loss + (b * w_nat * t["anti"]).sum() / w_nat.sum()
    return loss


def meta_step(model, wnet, wopt, zeta, x, x_adv, x_anti, y, w_nat, w_bdy, x_meta, y_meta, x_meta_adv, lr, lam):
    """Eqs. (27)-(28): virtual SGD step W_hat(Omega), TRADES meta loss of W_hat on the clean meta batch, Adam on Omega.

    The classifier runs through torch.func.functional_call on CLONED buffers, so the virtual and meta forwards (train
    mode, batch statistics) leave the real BN running statistics untouched. Returns the meta loss.
    """
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    w = wnet(zeta)                                                        # (B, 2), differentiable in Omega
    t = per_sample_losses(lambda inp: functional_call(model, (params, buffers), (inp,)), x, x_adv, x_anti, y)
    grads = torch.autograd.grad(weighted_loss(t, w[:, 0], w[:, 1], w_nat, w_bdy, lam), list(params.values()),
                                create_graph=True)
    fast = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}   # Eq. (27): W_hat, eta_1 = current lr
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    # DEVIATION: Eq. (28) weights the meta loss by alpha/beta of the meta samples; we use the unweighted TRADES loss
    # -- the literal form is minimised by sending every meta sample to the anti-adversary branch (an
    # anti-adversary's CE is at most the clean CE), which Omega could do without learning anything
    m = per_sample_losses(lambda inp: functional_call(model, (fast, buffers), (inp,)), x_meta, x_meta_adv, None, y_meta)
    meta_loss = (m["ce"] + lam * m["kl"]).mean()
    omega = list(wnet.parameters())
    wopt.zero_grad(set_to_none=True)
    for p, g in zip(omega, torch.autograd.grad(meta_loss, omega)):       # second order: through W_hat(Omega)
        p.grad = g
    wopt.step()                                                           # Eq. (28), Adam with step eta_2
    return meta_loss.detach()


def trades_init(x, seed):
    """x + 0.001 N(0, I) (Alg. 1, line 5) from a generator seeded with `seed`, exactly as attacks.linf draws it."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return (x + TRADES_INIT_STD * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)).clamp(0, 1)


def learns_direction(args):
    """Meta-CAAT Settings III and IV: the direction comes from f_Omega (and so the meta step runs)."""
    return args.method == "meta-caat" and args.setting in ("III", "IV")


def train_step(model, wnet, opt, wopt, x, y, meta_batch, ctx, args):
    """Alg. 1, lines 4-13 for meta-caat (and the Sec. 6.5 settings); the same harness for the baselines.

    ctx: class_counts, class_loss (updated here), w_nat, w_bdy, eps_cls (C,) tensors, num_classes, head (C,) bool.
    Returns per-sample alpha (adversary weight; > 0.5 counts as adversary), bound and the loss (device tensors).
    """
    meta = args.method == "meta-caat"
    n, eps = len(y), torch.full((len(y),), args.eps, device=x.device)
    learned = learns_direction(args)                                     # f_Omega decides the direction
    varied = (meta and args.setting in ("II", "IV")) or args.method in ("frl-remargin", "frl-both")
    model.eval()   # attacks are generated in eval mode (BN running stats frozen); README D3
    with torch.no_grad():
        logits_clean = model(x)
        if meta:   # Sec. 4.2: characteristics on the clean x, then the zeta_6 EMA update
            zeta = scale_characteristics(raw_characteristics(logits_clean, y, ctx["class_counts"], ctx["class_loss"]),
                                         ctx["num_classes"]) * ctx["keep_zeta"]
            ce_clean = F.cross_entropy(logits_clean, y, reduction="none")
            ctx["class_loss"] = update_class_loss(ctx["class_loss"], ce_clean, y)
            w = wnet(zeta) if learned else None
    if learned:
        a, b = w[:, 0], w[:, 1]
    elif meta and args.setting == "without":                             # Sec. 6.5 "Without": tail adv., head anti
        a = (~ctx["head"][y]).float()
        b = 1 - a
    else:
        a, b = torch.ones(n, device=x.device), torch.zeros(n, device=x.device)
    anti = meta and args.setting in ("III", "IV", "without")
    seed_adv, seed_anti = torch.randint(0, 2 ** 62, (2,)).tolist()
    if args.method == "pgd-at":
        x_adv = ATTACKS["linf"](model, x, y, eps=args.eps, steps=args.attack_steps, step_size=args.eps / 4)
        x_anti = None
    else:
        if varied and (args.bound == "remargin" or not meta):             # FRL ReMargin, class-wise (frlrmrw.py)
            eps = ctx["eps_cls"][y]
        elif varied:                                                      # Alg. 1, line 6: Eq. (26) at the init points
            # (the 0.001 N init lies far inside every eps ball, so attacks.linf's projection leaves it unchanged)
            g_adv, g_anti = input_grad_norms(model, logits_clean, trades_init(x, seed_adv), trades_init(x, seed_anti),
                                             y)
            eps = grad_bound(g_adv, g_anti, a.detach(), b.detach(), args.eps, args.bound_offset)
        x_adv = perturb(model, x, y, eps, args.attack_steps, 1, "kl", seed_adv)                        # line 8
        x_anti = perturb(model, x, y, eps, args.attack_steps, -1, "ce", seed_anti) if anti else None  # line 9
    x_meta_adv = None
    if learned:   # the meta batch's adversary against the current W, fixed eps (meta loss of meta_step)
        eps_meta = torch.full((len(meta_batch[1]),), args.eps, device=x.device)
        x_meta_adv = perturb(model, *meta_batch, eps_meta, args.attack_steps, 1, "kl",
                             int(torch.randint(0, 2 ** 62, (1,))))
    model.train()
    w_nat, w_bdy = ctx["w_nat"][y], ctx["w_bdy"][y]
    if learned:   # Alg. 1, lines 12-13: Eqs. (27), (28); then alpha/beta from the UPDATED Omega for Eq. (29)
        meta_step(model, wnet, wopt, zeta, x, x_adv, x_anti, y, w_nat, w_bdy, *meta_batch, x_meta_adv,
                  opt.param_groups[0]["lr"], args.lam)
        with torch.no_grad():
            w = wnet(zeta)
        a, b = w[:, 0], w[:, 1]
    opt.zero_grad(set_to_none=True)
    if args.method == "pgd-at":
        loss = F.cross_entropy(model(x_adv), y)                          # Madry et al.: CE on the PGD example
    else:
        loss = weighted_loss(per_sample_losses(model, x, x_adv, x_anti, y), a, b, w_nat, w_bdy, args.lam)  # Eq. (29)
    loss.backward()
    opt.step()
    return {"alpha": a.detach(), "eps": eps, "loss": loss.detach()}


# ----------------------------------------------------------------------------------------------------------------
# Metrics: class-wise natural / boundary / robust errors (Eqs. 45-47; worst boundary = class-wise max, as FRL's code)
# ----------------------------------------------------------------------------------------------------------------

# ==== BEGIN SHARED: caat-metrics (canonical: caat_meta.py; copies: caat_reinforce.py) ====
def class_error(correct, y, num_classes):
    """Per-class error (C,), NaN for classes absent from y."""
    n = torch.bincount(y, minlength=num_classes).float()
    hit = torch.zeros(num_classes, device=y.device).index_add_(0, y, correct.float())
    return torch.where(n > 0, 1 - hit / n.clamp_min(1), torch.full_like(n, float("nan"))).cpu()


def fairness_metrics(model, x_u8, y, steps_list, eps, num_classes, args):
    """Average (mean over classes) and worst-class natural, boundary and robust error, PGD-k for k in steps_list."""
    fns = {f"pgd{k}": (lambda k: lambda m, xb, yb: ATTACKS["linf"](m, xb, yb, eps=eps, steps=k, step_size=EVAL_STEP,
                                                                   init="uniform"))(k) for k in steps_list}
    res = evaluate(model, x_u8, y, fns, args.batch_size, args.seed)
    nat = class_error(res["correct"]["clean"], y, num_classes)
    ok = ~nat.isnan()
    out = {"nat_err": nat, "nat_err_avg": nat[ok].mean().item(), "nat_err_worst": nat[ok].max().item()}
    for name in fns:
        rob = class_error(res["correct"][name], y, num_classes)
        out.update({f"{name}/rob_err": rob, f"{name}/rob_err_avg": rob[ok].mean().item(),
                    f"{name}/rob_err_worst": rob[ok].max().item(), f"{name}/bdy_err_avg": (rob - nat)[ok].mean().item(),
                    f"{name}/bdy_err_worst": (rob - nat)[ok].max().item()})
    return out
# ==== END SHARED: caat-metrics ====


def plain(v):
    """JSON-safe value: tensors to lists, NaN (a class absent from the subset) to None."""
    if isinstance(v, torch.Tensor):
        return [None if math.isnan(e) else e for e in v.tolist()]
    return v


def flat(prefix, metrics):
    return {f"{prefix}/{k}": plain(v) for k, v in metrics.items()}


def direction_stats(acc, num_classes):
    """Per-class ratio of adversaries and mean bound (Figs. 9, 13); clean vs noisy split (Fig. 10), bounds in /255."""
    s = {k: v.cpu() for k, v in acc.items()}
    rec = {"caat/adv_ratio": (s["adv"].sum() / s["n"].sum().clamp_min(1)).item(),
           "caat/adv_ratio_class": (s["adv"] / s["n"].clamp_min(1)).tolist(),
           "caat/alpha_class": (s["alpha"] / s["n"].clamp_min(1)).tolist(),
           "caat/bound_class": (255 * s["eps"] / s["n"].clamp_min(1)).tolist()}
    for j, part in enumerate(("clean", "noisy")):
        rec[f"caat/adv_ratio_{part}"] = (s["adv_split"][j] / s["n_split"][j].clamp_min(1)).item()
        rec[f"caat/alpha_{part}"] = (s["alpha_split"][j] / s["n_split"][j].clamp_min(1)).item()
        rec[f"caat/bound_adv_{part}"] = (255 * s["eps_adv_split"][j] / s["adv_split"][j].clamp_min(1)).item()
        n_anti = s["n_split"][j] - s["adv_split"][j]
        rec[f"caat/bound_anti_{part}"] = (255 * s["eps_anti_split"][j] / n_anti.clamp_min(1)).item()
        rec[f"caat/n_{part}"] = int(s["n_split"][j])
    return rec


def accumulate(acc, y, noisy, alpha, eps):
    """Per-class and clean/noisy sums of: samples, adversaries (alpha > 0.5), alpha, bounds."""
    advf, nz, alpha = (alpha > 0.5).float(), noisy.long(), alpha.float()
    acc["alpha"].index_add_(0, y, alpha)
    acc["alpha_split"].index_add_(0, nz, alpha)
    acc["n"].index_add_(0, y, torch.ones_like(advf))
    acc["adv"].index_add_(0, y, advf)
    acc["eps"].index_add_(0, y, eps.float())
    acc["n_split"].index_add_(0, nz, torch.ones_like(advf))
    acc["adv_split"].index_add_(0, nz, advf)
    acc["eps_adv_split"].index_add_(0, nz, eps.float() * advf)
    acc["eps_anti_split"].index_add_(0, nz, eps.float() * (1 - advf))


# ----------------------------------------------------------------------------------------------------------------
# main: setup -> data scenario -> model -> (init / resume) -> epochs [FRL update, train, eval, log, ckpt] -> results
# ----------------------------------------------------------------------------------------------------------------

def main(args):
    resume = load_resume(args.resume, SCRIPT, "wnet") if args.resume else None
    if resume is not None:   # the run's settings from the checkpoint; device and testing aid from this command line
        args = argparse.Namespace(**{**resume["args"], "resume": args.resume, "device": args.device,
                                     "interrupt_at_step": args.interrupt_at_step})
    check_args(args)
    seed_everything(args.seed, args.deterministic)
    device = pick_device(args.device)
    out_dir = make_run_dir(args, SCRIPT, resuming=resume is not None)
    print(f"run directory: {out_dir}", flush=True)
    data = make_datasets(args, device)
    C = data["num_classes"]
    sc = build_scenario(args, data)
    steps_per_epoch = math.ceil(len(sc["train_y"]) / args.batch_size)
    pgd_steps = [int(s) for s in args.eval_pgd_steps.split(",")]
    if resume is None:
        save_checkpoint(out_dir / "corruption.pt", {**sc["saved"], "noise": args.noise if args.scenario == "noisy"
                                                    else "", "seed": args.seed})
        write_json(out_dir / "args.json", {**vars(args), "derived": {
            "steps_per_epoch": steps_per_epoch, "train_size": len(sc["train_y"]), "meta_size": len(sc["meta_y"]),
            "class_counts": sc["class_counts"].tolist(), "noise_realised": sc["noisy"].float().mean().item()},
            **run_info(device)})

    model = build_model(C, data["mean"], data["std"], args.width, args.activation).to(device)
    if args.init_ckpt:
        load_weights(model, args.init_ckpt)
    wnet = WeightingNet(args.hidden, args.tau).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    wopt = torch.optim.Adam(wnet.parameters(), lr=args.meta_lr, weight_decay=args.meta_weight_decay)
    total = max(args.epochs * steps_per_epoch, 1)   # piecewise: x0.1 at 50% and x0.01 at 75% of the iterations
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if args.schedule == "constant" or s < 0.5 * total
                                              else (0.1 if s < 0.75 * total else 0.01))
    fair = Fairness(C, args)
    data_gen = torch.Generator().manual_seed(args.seed)        # shuffling + augmentation
    meta_gen = torch.Generator().manual_seed(args.seed + 1)    # meta-batch draws (Alg. 1, line 3)
    order = torch.sort(sc["class_counts"].cpu(), descending=True, stable=True).indices
    head = torch.zeros(C, dtype=torch.bool)
    head[order[: C // 2]] = True                                # "Without": the larger half of the classes is head
    keep_zeta = torch.ones(len(CHARACTERISTICS), device=device)
    for i in [int(s) for s in args.drop_characteristic.split(",") if s.strip()]:
        keep_zeta[i - 1] = 0.0                                  # Fig. 15 ablation: zeta_i removed (input set to 0)
    ctx = {"class_counts": sc["class_counts"], "class_loss": torch.full((C,), math.log(C), device=device),
           "num_classes": C, "head": head.to(device), "keep_zeta": keep_zeta}
    test_x, test_y = data["test_x"][: args.eval_examples], data["test_y"][: args.eval_examples]
    train_index = torch.arange(len(sc["train_y"]), device=device)
    # DEVIATION: FRL (ReMargin) reweights only the natural term and normalises CE and KL by their own weight sums
    # (weighted_loss), where FRL's frlrm.py divides by the joint sum -- one loss form for every method
    use = {"meta-caat": ("nat", "bdy") if args.fairness else (), "frl-reweight": ("nat", "bdy"),
           "frl-remargin": ("nat",), "frl-both": ("nat", "bdy"), "baseline-reweight": ("rob",)}.get(args.method, ())
    if args.method in ("frl-remargin", "frl-both") or (args.method == "meta-caat" and args.bound == "remargin"):
        use = use + ("m",)

    state = {"epoch": 0, "step": 0, "results": {}, "time_s": 0.0}
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        wnet.load_state_dict(resume["wnet"])
        wopt.load_state_dict(resume["wnet_optimizer"])
        fair.load_state_dict(resume["fairness"])
        ctx["class_loss"] = resume["class_loss"].to(device)
        state = {k: resume[k] for k in state}
        restore_rng(resume["rng"], data_gen, meta_gen)
        truncate_log(out_dir / "log.jsonl", state["step"])
    elif args.init_ckpt:   # epoch 0 = the starting model
        state["results"]["initial"] = fairness_metrics(model, test_x, test_y, pgd_steps, args.eps, C, args)
        append_jsonl(out_dir / "log.jsonl", {"epoch": 0, "step": 0, **flat("test", state["results"]["initial"])})
    t_start = time.time() - state["time_s"]

    for epoch in range(state["epoch"], args.epochs):
        t_epoch, rec = time.time(), {"epoch": epoch + 1}
        if use:   # Eq. (19) via FRL: multipliers from PGD errors on the clean validation (= meta) split, per epoch
            val = fairness_metrics(model, sc["meta_x"], sc["meta_y"], [args.val_attack_steps], args.eps, C, args)
            fair.update(val["nat_err"], val[f"pgd{args.val_attack_steps}/rob_err"], epoch, use)
            rec.update({"val/nat_err_avg": val["nat_err_avg"],
                        "val/rob_err_avg": val[f"pgd{args.val_attack_steps}/rob_err_avg"]})
        rob_w = fair.class_weight("rob").to(device)
        ctx.update(w_nat=rob_w if "rob" in use else fair.class_weight("nat").to(device),
                   w_bdy=rob_w if "rob" in use else fair.class_weight("bdy").to(device),
                   eps_cls=fair.class_eps(args.eps).to(device))
        acc = {k: torch.zeros(C, device=device) for k in ("n", "adv", "alpha", "eps")}
        acc.update({k: torch.zeros(2, device=device)   # index 0 = clean label, 1 = noisy label
                    for k in ("n_split", "adv_split", "alpha_split", "eps_adv_split", "eps_anti_split")})
        loss_sum, n_steps, t_steps = torch.zeros((), device=device), 0, 0.0
        # iterate over indices (as "labels") so that each batch knows its samples' labels and noisy flags
        for x, idx in iterate_batches(sc["train_x"], train_index, args.batch_size, data_gen, augment=data["augment"]):
            y = sc["train_y"][idx]
            meta_batch = None
            if learns_direction(args):   # Alg. 1, line 3: m clean meta samples, no augmentation
                mi = torch.randint(0, len(sc["meta_y"]), (args.meta_batch_size,), generator=meta_gen).to(device)
                meta_batch = (to_float(sc["meta_x"][mi]), sc["meta_y"][mi])
            t0 = time.time()
            s = train_step(model, wnet, opt, wopt, x, y, meta_batch, ctx, args)
            sched.step()
            if device.type == "cuda":
                torch.cuda.synchronize()   # honest per-iteration timing (time/step_s, the cost comparison)
            t_steps += time.time() - t0
            accumulate(acc, y, sc["noisy"][idx], s["alpha"], s["eps"])
            loss_sum += s["loss"]
            n_steps += 1
            state["step"] += 1
            if args.interrupt_at_step and state["step"] == args.interrupt_at_step:
                print(f"--interrupt-at-step {args.interrupt_at_step}: simulated crash", flush=True)
                sys.exit(3)
            if args.max_steps and state["step"] >= args.max_steps:
                break
        rec.update({"step": state["step"], "lr": opt.param_groups[0]["lr"],
                    "train/loss": loss_sum.item() / max(n_steps, 1),
                    **direction_stats(acc, C), "frl/w_nat": ctx["w_nat"].tolist(), "frl/w_bdy": ctx["w_bdy"].tolist(),
                    "frl/eps_class": (255 * ctx["eps_cls"]).tolist(), "time/step_s": t_steps / max(n_steps, 1)})
        last = epoch + 1 == args.epochs or bool(args.max_steps and state["step"] >= args.max_steps)
        if (epoch + 1) % args.eval_every == 0 or last:
            state["results"]["final"] = fairness_metrics(model, test_x, test_y, pgd_steps, args.eps, C, args)
            rec.update(flat("test", state["results"]["final"]))
            k = f"test/pgd{pgd_steps[0]}"
            print(f"epoch {epoch + 1}/{args.epochs} | lr {rec['lr']:.4f} | loss {rec['train/loss']:.3f} | adv ratio "
                  f"{rec['caat/adv_ratio']:.2f} | nat err {rec['test/nat_err_avg']:.3f}/"
                  f"{rec['test/nat_err_worst']:.3f} "
                  f"| rob err {rec[k + '/rob_err_avg']:.3f}/{rec[k + '/rob_err_worst']:.3f} | "
                  f"{time.time() - t_epoch:.1f}s", flush=True)
        rec["time/epoch_s"] = time.time() - t_epoch
        append_jsonl(out_dir / "log.jsonl", rec)
        state.update(epoch=args.epochs if last else epoch + 1, time_s=time.time() - t_start)
        save_checkpoint(out_dir / "ckpt.pt", {
            "format": 1, "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "wnet": wnet.state_dict(), "wnet_optimizer": wopt.state_dict(), "fairness": fair.state_dict(),
            "class_loss": ctx["class_loss"].cpu(), "rng": capture_rng(data_gen, meta_gen), "args": vars(args),
            **state, **model_meta(args, data)})
        if last:
            break

    wall = time.time() - t_start
    save_checkpoint(out_dir / "model.pt", {"format": 1, "model": model.state_dict(), "args": vars(args),
                                           **model_meta(args, data)})
    results = {k: {m: plain(v) for m, v in r.items()} for k, r in state["results"].items()}
    results.update({"method": args.method, "setting": args.setting, "scenario": args.scenario, "steps": state["step"],
                    "time/total_s": wall, "eval_examples": len(test_y)})
    write_json(out_dir / "results.json", results)
    print(f"done in {wall:.1f}s: {out_dir / 'results.json'}", flush=True)
    return results


def check_args(args):
    """Clear errors for bad flag values (argparse handles the choices)."""
    if not args.meta_per_class:
        args.meta_per_class = 5 if args.dataset == "fake" else 300
    for flag in ("batch_size", "eval_examples", "eval_every", "meta_per_class", "meta_batch_size", "hidden",
                 "attack_steps", "val_attack_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)!r}")
    if not 0 < args.eps <= 1 or args.lam < 0 or args.tau <= 0:
        raise ValueError(f"need 0 < --eps <= 1, --lam >= 0, --tau > 0; got {args.eps!r}, {args.lam!r}, {args.tau!r}")
    if not 0 <= args.noise_rate <= 1:
        raise ValueError(f"--noise-rate must lie in [0, 1], got {args.noise_rate!r}")
    if args.imbalance < 1:
        raise ValueError(f"--imbalance (IF = n_max / n_min) must be >= 1, got {args.imbalance!r}")
    if not all(s.strip() in ("1", "2", "3", "4", "5", "6") for s in args.drop_characteristic.split(",") if s.strip()):
        raise ValueError(f"--drop-characteristic takes indices 1..6 of {CHARACTERISTICS}, "
                         f"got {args.drop_characteristic!r}")
    if not all(s.strip().isdigit() and int(s) > 0 for s in args.eval_pgd_steps.split(",")):
        raise ValueError(f"--eval-pgd-steps must be a comma list of positive ints, got {args.eval_pgd_steps!r}")
    if args.method != "meta-caat" and (args.setting != "IV" or args.drop_characteristic):
        raise ValueError(f"--setting/--drop-characteristic are Meta-CAAT ablations; --method is {args.method!r}")
    if args.attacks not in ("", "linf"):
        raise ValueError(f"caat_meta.py trains and evaluates with l_inf PGD only; drop --attacks {args.attacks!r}")
    if args.amp:
        raise ValueError("--amp is not supported by caat_meta.py (the second-order meta step runs in fp32)")


def model_meta(args, data):
    return {"arch": "preact_resnet18", "width": args.width, "activation": args.activation,
            "num_classes": data["num_classes"], "dataset": args.dataset, "mean": list(data["mean"]),
            "std": list(data["std"]), "method": args.method}


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
                   help="bf16 autocast for the training forward/backward (attacks stay fp32)")
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
# ==== END SHARED: setup ====


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
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def save_checkpoint(path, obj):
    """Atomic torch.save: write path.tmp, then os.replace (a kill at any moment leaves the old or the new file)."""
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


def truncate_log(path, step):
    """On resume, keep only the log lines up to the checkpoint's step (later ones are written again, identically)."""
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        write_text(path, "".join(l + "\n" for l in lines))
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


def augment_batch(x, generator, kind, pad=4):
    """Random crop (zero padding `pad`) and, for kind 'crop_flip', horizontal flip, batched on x's device."""
    b, c, h, w = x.shape
    offs = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    flip = torch.rand(b, generator=generator).to(x.device) < 0.5
    rows = (offs[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]   # (B, 1, H, 1)
    cols = offs[1][:, None] + torch.arange(w, device=x.device)                       # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols) if kind == "crop_flip" else cols
    bidx = torch.arange(b, device=x.device)[:, None, None, None]
    cidx = torch.arange(c, device=x.device)[None, :, None, None]
    return F.pad(x, (pad,) * 4)[bidx, cidx, rows, cols[:, None, None, :]]


def iterate_batches(x_u8, y, batch_size, generator=None, augment=None):
    """Yield float [0,1] batches; shuffled and augmented when a generator is given, else in order."""
    n = len(y)
    order = torch.randperm(n, generator=generator).to(y.device) if generator is not None else \
        torch.arange(n, device=y.device)
    for i in range(0, n, batch_size):
        idx = order[i: i + batch_size]
        xb = to_float(x_u8[idx])
        yield (augment_batch(xb, generator, augment) if generator is not None and augment else xb), y[idx]
# ==== END SHARED: data ====


# ==== BEGIN SHARED: evaluate (canonical: cas.py; copies: caat_meta.py, caat_reinforce.py, eval.py) ====
def evaluate(model, x_u8, y, attack_fns, batch_size, seed):
    """Clean accuracy and accuracy under each attack (dict name -> fn(model, x, y) -> x_adv) on (x_u8, y).

    Eval mode throughout (the mode is restored after). The RNG is forked and re-seeded before each attack, so a result
    depends neither on the training RNG nor on which other attacks ran. Also returns per-example correctness.
    """
    was_training = model.training
    model.eval()
    devices = [y.device.index or 0] if y.device.type == "cuda" else []
    correct = {}
    with torch.no_grad():
        correct["clean"] = torch.cat([model(xb).argmax(1) == yb for xb, yb in iterate_batches(x_u8, y, batch_size)])
    for name, fn in attack_fns.items():
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            hits = []
            for xb, yb in iterate_batches(x_u8, y, batch_size):
                x_adv = fn(model, xb, yb)
                with torch.no_grad():
                    hits.append(model(x_adv).argmax(1) == yb)
            correct[name] = torch.cat(hits)
    model.train(was_training)
    acc = {k: v.float().mean().item() for k, v in correct.items()}
    return {"clean": acc.pop("clean"), "attacks": acc, "correct": correct}
# ==== END SHARED: evaluate ====


# ==== BEGIN SHARED: io (canonical: cas.py; copies: caat_meta.py, caat_reinforce.py, eval.py) ====
def write_text(path, text):
    """Atomic write (temp file + os.replace): a crash never leaves a half-written file."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


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
