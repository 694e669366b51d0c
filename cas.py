"""CAS -- Calibrated Adversarial Sampling, reference implementation (with the SAT, E-AT, Order and AVG baselines).

Fine-tunes an l_p-robust PreActResNet-18 against M attacks ("arms", names of attacks.ATTACKS), choosing ONE attack
per mini-batch with a multi-armed bandit: UCB (Eq. 9) over a reward made of each arm's own loss trend (Eq. 6) and
its cross-attack trade-off (Eq. 7); the model takes one SGD step on the hybrid loss (Eq. 8). "Eq. (k)" and "Alg. 1,
line n" refer to the CAS paper (Wang, Wei, Zhang, Sun: "Calibrated Adversarial Sampling: Multi-Armed Bandit-Guided
Generalization Against Unforeseen Attacks"); "README D<n>" to the numbered implementation details of README.md#caspy.

    python cas.py --dataset cifar10                                   # pre-train (l_p PGD-AT), then CAS: the whole job
    python cas.py --dataset cifar10 --init-ckpt runs/pre/model.pt     # CAS from an l_p-robust model (the paper)
    torchrun --standalone --nproc_per_node 8 cas.py --dataset cifar10  # the same on 8 GPUs (README D25)
    python cas.py --dataset fake --device cpu --width 8 --pretrain-epochs 1 --epochs 1 --max-steps 2 \
        --attack-steps 1 --eval-attack-steps 1 --eval-examples 8 --attacks linf,l2,l1   # smoke test (seconds)

Writes args.json, log.jsonl, ckpt.pt, model.pt, results.json into the run directory printed first; `--resume DIR`
continues it. `from cas import CASSampler` gives the bandit alone (the script runs only under __main__).
"""

import argparse
import json
import math
import os
import random
import sys
import textwrap
import time
from collections import deque
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import attacks
from attacks import ATTACKS, attack_settings, load_eps_table

SCRIPT = "cas"
SAMPLERS = ("cas", "sat", "eat", "order", "avg")


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_flags(parser)
    parser.set_defaults(epochs=10, lr=0.1)   # Sec. 5.1: 10 epochs of fine-tuning at initial lr 0.1
    g = parser.add_argument_group("CAS (Alg. 1)")
    g.add_argument("--sampler", type=str, default="cas", choices=SAMPLERS,
                   help="cas (Alg. 1), or a baseline: sat (pi ~ w), eat (E-AT), order (weighted cycle), avg (all arms)")
    g.add_argument("--alpha", type=float, default=10.0, help="reward scale alpha of Eq. (9), > 0 (Sec. 5.1)")
    g.add_argument("--beta", type=fraction, default=8 / 9, help="adversarial weight beta in [0, 1] of Eq. (8)")
    g.add_argument("--window", type=int, default=10, help="W >= 2: an arm's own last W pulls in the slope of Eq. (6)")
    g.add_argument("--tradeoff", action=argparse.BooleanOptionalAction, default=True,
                   help="R^tradeoff of Eq. (7) (--no-tradeoff: R = R^self, Table 4 ablation)")
    g.add_argument("--ucb", action=argparse.BooleanOptionalAction, default=True,
                   help="the exploration term of Eq. (9) (--no-ucb: Table 4 ablation)")
    g.add_argument("--scenario", type=str, default="auto", choices=("auto", "cifar", "svhn"),
                   help="importance weights w_v of Sec. 5.1 (auto: svhn for SVHN, else cifar)")
    g.add_argument("--schedule", type=str, default="cosine", choices=("cosine", "piecewise"),
                   help="fine-tuning lr schedule (the paper gives none; README D7)")
    g.add_argument("--eval-attack-steps", type=int, default=20,
                   help="per-epoch evaluation: at most N steps per attack (0 = full strength, as eval.py)")
    g.add_argument("--log-every", type=int, default=50, help="iterations per bandit log line (pi, N, R)")
    g.add_argument("--pretrain-epochs", type=int, default=100,
                   help="without --init-ckpt: l_p PGD-AT epochs before fine-tuning (lr 0.1, /10 at 50%% and 75%%)")
    c = parser.add_argument_group("calibration of the semantic budgets (Eq. 11)")
    c.add_argument("--eps-table", type=str, default="", help="JSON {attack: eps} (e.g. eps_table.json of --calibrate)")
    c.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=False,
                   help="calibrate every semantic budget with Eq. (11) on the starting model before fine-tuning")
    c.add_argument("--calib-lambda", type=float, default=0.6, help="lambda_k of Eq. (11), one for all attacks (D11)")
    c.add_argument("--calib-range", type=float, nargs=2, default=(0.2, 0.6), metavar=("LO", "HI"),
                   help="target robust-accuracy range (Sec. 5.1: 20%%-60%%)")
    c.add_argument("--calib-rounds", type=int, default=6, help="at most this many Eq. (11) updates per attack")
    c.add_argument("--calib-examples", type=int, default=500,
                   help="first N TRAINING images (no augmentation) to calibrate on; the test images stay unseen")
    return parser


def check_args(args):
    """CAS flags outside their meaning (the common ones are checked by check_common_args)."""
    if args.resume:
        return load_resume(args.resume, SCRIPT, "sampler") and None
    if not args.alpha > 0:
        raise ValueError(f"--alpha {args.alpha}: must be > 0 (Eq. 9; the paper sweeps 1-50, a negative alpha "
                         f"inverts the bandit's preference)")
    if not 0.0 <= args.beta <= 1.0:
        raise ValueError(f"--beta {args.beta}: must lie in [0, 1] (Eq. 8)")
    for flag, low in (("window", 2), ("log_every", 1), ("pretrain_epochs", 0), ("eval_attack_steps", 0),
                      ("calib_rounds", 0), ("calib_examples", 1)):
        if getattr(args, flag) < low:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= {low}")
    if not (0 <= args.calib_range[0] < args.calib_range[1] <= 1 and args.calib_lambda > 0):
        raise ValueError(f"--calib-range {args.calib_range} / --calib-lambda {args.calib_lambda}: need "
                         f"0 <= LO < HI <= 1 and lambda > 0")
    load_eps_table(args.eps_table)


def get_args(argv=None):
    return parse_args(make_parser(), argv, check_args)


# ----------------------------------------------------------------------------------------------------------------
# The bandit (Sec. 4.2-4.3, Alg. 1): probs / sample / update / state_dict, the interface the baselines share
# ----------------------------------------------------------------------------------------------------------------

LOSS_FLOOR = 1e-8     # losses are clamped below before log() (README D1)
EXP_CLAMP = 50.0      # alpha * R is clamped to [-50, 50] before exp() (README D5)


def slope(values):
    """Least-squares slope of values[j] against j = 0..n-1 (0 for fewer than 2 points)."""
    n = len(values)
    if n < 2:
        return 0.0
    j_mean, v_mean = (n - 1) / 2, sum(values) / n
    return (sum((j - j_mean) * (v - v_mean) for j, v in enumerate(values))
            / sum((j - j_mean) ** 2 for j in range(n)))


class _Sampler:
    """Validated weights, pull counts and a seeded generator (random.Random: plain-type state, own stream)."""

    def __init__(self, weights, seed=0):
        self.w = [float(w) for w in weights]
        if not self.w or any(not (w > 0 and math.isfinite(w)) for w in self.w):
            raise ValueError(f"weights must be a non-empty sequence of positive floats, got {list(weights)!r}")
        self.M, self.rng, self.pulls = len(self.w), random.Random(seed), [0] * len(self.w)

    def sample(self) -> int:
        return self.rng.choices(range(self.M), weights=self.probs())[0]              # Alg. 1, line 9

    def update(self, arm, loss, correct=0, total=0):
        self.pulls[arm] += 1

    def rewards(self):
        return [0.0] * self.M, [0.0] * self.M

    def state_dict(self):
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "pulls": list(self.pulls)}

    def load_state_dict(self, d):
        version, internal, gauss = d["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.pulls = list(d["pulls"])


class CASSampler(_Sampler):
    """Calibrated Adversarial Sampling: UCB over R = R^self + R^tradeoff (Eqs. 5-7, 9, 10; Alg. 1).

    update(arm, loss): the pulled arm's mean adversarial CE on its batch, measured before the SGD step.
    """

    def __init__(self, weights, alpha=10.0, window=10, tradeoff=True, ucb=True, seed=0):
        super().__init__(weights, seed)
        if window < 2:
            raise ValueError(f"window must be >= 2 to fit a slope (Eq. 6), got {window!r}")
        self.alpha, self.window, self.tradeoff, self.ucb = float(alpha), int(window), bool(tradeoff), bool(ucb)
        # DEVIATION: N_v starts at 1 (Sec. 4.3), not 0 (Alg. 1, line 1), which would divide by zero in Eq. (9)
        self.N = [1] * self.M
        # DEVIATION: Eq. (6)'s slope runs over the arm's OWN last W pulls, indexed j = 0..n-1, not over the global
        # iterations t-W+1..t of Alg. 1, line 4 (with 21 arms a global window rarely holds two pulls); README D2
        self.logL = [deque(maxlen=self.window) for _ in range(self.M)]
        self.since = [[0] * self.M for _ in range(self.M)]    # since[k][j]: pulls of j since k's latest pull
        self.between = [[0] * self.M for _ in range(self.M)]  # between[k][j] = n_{j,k} of Eq. (7)
        self.last_two = [[0.0, 0.0] for _ in range(self.M)]   # log L_k at t_prev and t_curr

    def update(self, arm, loss, correct=0, total=0):
        """Record the pulled arm's loss and the cross-type records (Alg. 1, lines 10 and 14)."""
        log_l = math.log(max(float(loss), LOSS_FLOOR))
        # DEVIATION: n_{j,k} counts the pulls of j strictly between k's two latest pulls, so n_{k,k} = 0 (the paper
        # leaves the interval's ends open); README D4
        self.between[arm], self.since[arm] = self.since[arm], [0] * self.M
        for k in range(self.M):
            if k != arm:
                self.since[k][arm] += 1
        self.last_two[arm] = [self.last_two[arm][1], log_l]
        self.logL[arm].append(log_l)
        self.N[arm] += 1                                                                # Alg. 1, line 10
        super().update(arm, loss)

    def rewards(self):
        """R^self (Eq. 6) and R^tradeoff (Eq. 7) per arm."""
        r_self = [-self.w[v] * slope(list(self.logL[v])) for v in range(self.M)]      # Eq. (6)
        r_trade = [0.0] * self.M
        for k in range(self.M) if self.tradeoff else ():
            total = sum(self.between[k])
            if self.pulls[k] < 2 or total == 0:     # no two pulls of k, or nothing in between: k contributes 0
                continue
            log_ratio = self.last_two[k][0] - self.last_two[k][1]                      # log(L_k^prev / L_k^curr)
            for v in range(self.M):
                if v != k and self.between[k][v]:
                    r_trade[v] += self.w[k] * self.between[k][v] / total * log_ratio    # Eq. (7)
        return r_self, r_trade

    def probs(self):
        """pi of Eq. (10) from the scores of Eq. (9)."""
        r_self, r_trade = self.rewards()
        log_total, scores = math.log(sum(self.N)), []
        for v in range(self.M):
            r = r_self[v] + r_trade[v]                                                  # Eq. (5)
            # DEVIATION: alpha * R is clamped to [-50, 50] so exp() never overflows (README D5)
            s = math.exp(min(max(self.alpha * r, -EXP_CLAMP), EXP_CLAMP))              # Eq. (9), exploitation
            if self.ucb:
                s += math.sqrt(2.0 * log_total / self.N[v])                             # Eq. (9), exploration
            scores.append(s * self.w[v])
        z = sum(scores)
        return [s / z for s in scores]                                                  # Eq. (10)

    def state_dict(self):
        return {**super().state_dict(), "N": list(self.N), "logL": [list(q) for q in self.logL],
                "since": [list(r) for r in self.since], "between": [list(r) for r in self.between],
                "last_two": [list(r) for r in self.last_two]}

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self.N, self.logL = list(d["N"]), [deque(q, maxlen=self.window) for q in d["logL"]]
        self.since, self.between = [list(r) for r in d["since"]], [list(r) for r in d["between"]]
        self.last_two = [list(r) for r in d["last_two"]]


# ----------------------------------------------------------------------------------------------------------------
# One training iteration (Alg. 1, lines 9-14)
# ----------------------------------------------------------------------------------------------------------------

def train_step(model, optimizer, x, y, arms, weights, sampler, beta, amp):
    """One iteration of Alg. 1 (or of AVG when sampler is None) on the global batch (x, y); returns host-side stats
    after ONE host sync. Under torchrun each rank attacks and trains on its slice; gradients and the losses the
    sampler observes are those of the global batch, so every rank's sampler draws the same arm (README D25)."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)
    n_global, (x, y) = len(y), (local_part(x), local_part(y))
    names = list(arms)
    picked = list(range(len(names))) if sampler is None else [sampler.sample()]     # Alg. 1, line 9
    model.eval()   # attacks are generated in eval mode (BN running stats frozen); README D3
    x_adv = [arms[names[v]](model, x, y) for v in picked]   # Alg. 1, line 11 (AVG: every arm, all before training)
    eat_correct = torch.zeros((), device=x.device)
    if isinstance(sampler, EATSampler):
        # DEVIATION: E-AT counts a point robust if it is correct at EVERY attack iterate; our attacks return only the
        # final iterate, so it is counted there -- in eval mode and fp32 as E-AT does; one extra forward (README D9)
        with torch.no_grad():
            eat_correct = (model(x_adv[0]).argmax(1) == y).sum()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    wsum, ce, clean = sum(weights[v] for v in picked), [], torch.zeros((), device=x.device)
    for v, xa in zip(picked, x_adv):
        with autocast:
            ce.append(F.cross_entropy(model(xa), y))                                    # CE(f(x_adv), y)
            if len(picked) == 1 and beta < 1:
                clean = F.cross_entropy(model(x), y)
                loss = beta * ce[-1] + (1 - beta) * clean                               # Eq. (8), Alg. 1, line 12
            else:   # beta = 1, or AVG: gradients accumulated arm by arm (the memory of one attack at a time)
                loss = beta * weights[v] / wsum * ce[-1]
        loss.backward()
    if len(picked) > 1 and beta < 1:   # AVG: sum_v w_v Eq.(8)_v / sum_v w_v; its clean term is computed once
        with autocast:
            clean = F.cross_entropy(model(x), y)
        ((1 - beta) * clean).backward()
    sync_gradients(model.parameters(), len(y) / n_global)                              # torchrun: global gradient
    optimizer.step()                                                                    # Alg. 1, line 13
    share = len(y) / n_global   # the global batch's mean losses and E-AT's count, summed over the ranks
    stats = all_sum(torch.stack([c.detach().float() * share for c in ce] + [clean.detach().float() * share,
                                                                           eat_correct.float()]))
    *ce_v, clean_v, correct = stats.tolist()                                            # the one host sync
    if sampler is not None:
        sampler.update(picked[0], ce_v[0], correct=int(correct), total=n_global)        # Alg. 1, lines 10 and 14
    loss_adv = sum(weights[v] * c for v, c in zip(picked, ce_v)) / wsum
    return {"arm": picked[0] if sampler is not None else -1, "loss_adv": loss_adv,
            "loss": beta * loss_adv + (1 - beta) * clean_v}


# ----------------------------------------------------------------------------------------------------------------
# The baselines (Sec. 5.1), behind the same interface
# ----------------------------------------------------------------------------------------------------------------

class SATSampler(_Sampler):
    """SAT (Madaan et al. 2021): a fixed pi_v proportional to w_v (uniform when all weights are 1)."""

    def probs(self):
        z = sum(self.w)
        return [w / z for w in self.w]


class EATSampler(_Sampler):
    """E-AT (Croce & Hein 2022): pi_v ~ (1 - r_v) w_v, r_v = cumulative robust accuracy of arm v's training attack.

    r_v = 0.5 for all (pi ~ w) until every arm was pulled once, as in https://github.com/fra31/robust-finetuning.
    """

    def __init__(self, weights, seed=0):
        super().__init__(weights, seed)
        self.correct, self.seen = [0] * self.M, [0] * self.M

    def update(self, arm, loss, correct=0, total=0):
        self.correct[arm] += int(correct)
        self.seen[arm] += int(total)
        super().update(arm, loss)

    def probs(self):
        q = [(1 - c / s) * w for c, s, w in zip(self.correct, self.seen, self.w)] if all(self.seen) else self.w
        q = q if sum(q) > 0 else self.w             # every arm fully robust so far: pi ~ w
        z = sum(q)
        return [v / z for v in q]

    def state_dict(self):
        return {**super().state_dict(), "correct": list(self.correct), "seen": list(self.seen)}

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self.correct, self.seen = list(d["correct"]), list(d["seen"])


class OrderSampler(_Sampler):
    """Order: a fixed interleaved cycle in which arm v appears round(w_v) >= 1 times: pass r visits, in arm order,
    every arm with w_v > r (weights 6,6,6,1,...: one pass over all arms, then five over the three heavy ones)."""

    def __init__(self, weights, seed=0):
        super().__init__(weights, seed)
        reps = [max(1, round(w)) for w in self.w]
        self.cycle, self.pos = [v for r in range(max(reps)) for v in range(self.M) if reps[v] > r], 0

    def probs(self):
        return [float(v == self.sample()) for v in range(self.M)]

    def sample(self):
        return self.cycle[self.pos % len(self.cycle)]

    def update(self, arm, loss, correct=0, total=0):
        self.pos += 1
        super().update(arm, loss)

    def state_dict(self):
        return {**super().state_dict(), "pos": self.pos}

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self.pos = int(d["pos"])


def make_sampler(kind, weights, args):
    """The sampler of --sampler (AVG: None, every arm on every batch)."""
    if kind == "cas":
        return CASSampler(weights, args.alpha, args.window, args.tradeoff, args.ucb, seed=args.seed)
    return {"sat": SATSampler, "eat": EATSampler, "order": OrderSampler}[kind](weights, seed=args.seed) \
        if kind != "avg" else None


# ----------------------------------------------------------------------------------------------------------------
# Arms and their budgets: attack strength comes from attacks.attack_settings (README D8), budgets from Eq. (11)
# ----------------------------------------------------------------------------------------------------------------

def make_arms(names, mode, dataset, steps, eps_table, bf16=False):
    """{name: fn(model, x, y) -> x_adv} at training or evaluation strength, eps from the table where it has one;
    bf16 (--attack-bf16): the attack gets the model's forward in bf16 (AttackModel). Calibration (Eq. 11) keeps
    fp32: it sets the budgets once, where precision matters more than time."""
    arms = {n: partial(ATTACKS[n], **attack_settings(n, mode, dataset=dataset, eps=eps_table.get(n), steps=steps))
            for n in names}
    return {n: (lambda f: lambda m, x, y: f(attack_model(m, bf16), x, y))(f) for n, f in arms.items()} if bf16 else arms


def calibrate(model, x_u8, y, names, args, eps_table):
    """Eq. (11): eps_k = (lambda + acc_adv[k]) * eps, eps the ORIGINAL margin, repeated until acc_adv[k] is in range.

    acc_adv[k] is measured at the current eps_k, at full evaluation strength; only semantic arms are calibrated (the
    l_p budgets and PPGD's bound are the paper's). Stops in range, after --calib-rounds updates, or at a fixed point
    outside the range. Returns the new table and {attack: {eps, acc, rounds, in_range, history}}.
    """
    lo, hi = args.calib_range
    table, report = dict(eps_table), {}
    for name in [n for n in names if n in attacks.SEMANTIC]:
        eps0 = attack_settings(name, dataset=args.dataset, eps=table.get(name))["eps"]   # the original margin
        eps, history = eps0, []
        for r in range(args.calib_rounds + 1):
            arm = make_arms([name], "eval", args.dataset, None, {name: eps})
            acc = evaluate(model, x_u8, y, arm, args.batch_size, args.seed, world(), all_gather)["attacks"][name]
            history.append([eps, acc])
            if lo <= acc <= hi or r == args.calib_rounds:
                break
            # DEVIATION: one lambda for every attack (the paper's lambda_k is per attack and not given); README D11
            eps = (args.calib_lambda + acc) * eps0                                      # Eq. (11)
            if any(eps == e for e, _ in history):   # a fixed point (or cycle) of Eq. (11) outside the range: stop
                eps, acc = next((e, a) for e, a in history if e == eps)
                break
        table[name] = eps
        report[name] = {"eps": eps, "acc": acc, "rounds": len(history) - 1, "in_range": lo <= acc <= hi,
                        "history": history}
        print(f"calibrate {name:13s} eps {eps0:.4g} -> {eps:.4g} | robust acc {acc:.3f} "
              f"({'in' if lo <= acc <= hi else 'OUT OF'} range [{lo}, {hi}]) after {len(history) - 1} update(s)",
              flush=True)
    return table, report


# ----------------------------------------------------------------------------------------------------------------
# Stages: l_p pre-training is SAT with one l_p arm, beta = 1 and a piecewise schedule, run by the same loop (D10)
# ----------------------------------------------------------------------------------------------------------------

class Stage(NamedTuple):
    name: str
    attacks: list
    weights: list
    sampler: str
    beta: float
    schedule: str
    epochs: int


def plan(args):
    """[l_p pre-training (only without --init-ckpt)] then the fine-tuning of Alg. 1 with --sampler."""
    names = attacks.registered(args.attacks) if args.attacks else list(attacks.ALL)
    stages = [Stage("finetune", names, scenario_weights(names, scenario(args)), args.sampler, args.beta,
                    args.schedule, args.epochs)]
    if not args.init_ckpt and args.pretrain_epochs:   # Sec. 5.1: l_inf PGD-AT for CIFAR-10, l_2 for CIFAR-100 / SVHN
        arm = "linf" if args.dataset in ("cifar10", "fake") else "l2"
        stages.insert(0, Stage("pretrain", [arm], [1.0], "sat", 1.0, "piecewise", args.pretrain_epochs))
    return stages


def epoch_steps(data, args):
    """Iterations per epoch (with --compile only full batches: one batch shape, no recompilation)."""
    return num_batches(len(data["train_y"]), args.batch_size, args.compile)


def scenario(args):
    return args.scenario if args.scenario != "auto" else ("svhn" if args.dataset == "svhn" else "cifar")


def make_schedule(optimizer, kind, total_steps):
    """Per-iteration lr: cosine to 0 (D7), or piecewise x0.1 at 50% and 75% of the steps (Rice et al. 2020)."""
    total = max(total_steps, 1)
    fn = (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))) if kind == "cosine" else \
        (lambda s: 1.0 if s < 0.5 * total else (0.1 if s < 0.75 * total else 0.01))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# ----------------------------------------------------------------------------------------------------------------
# main: resume -> seed, device, run dir -> data, model -> per stage: optimizer, schedule, sampler -> epochs -> results
# ----------------------------------------------------------------------------------------------------------------

def main(args):
    init_distributed(args.device)   # torchrun: one process per GPU (README D25); plain python: rank 0 of 1
    resume = load_resume(args.resume, SCRIPT, "sampler") if args.resume else None
    if resume is not None:   # the run's settings from its checkpoint; where to run (and the testing aid) from here
        args = argparse.Namespace(**{**resume["args"], "resume": args.resume, "device": args.device,
                                     "interrupt_at_step": args.interrupt_at_step})
    seed_everything(args.seed, args.deterministic)
    device = pick_device(args.device)
    resolve_speed_flags(args, device)   # --attack-bf16 (default: on for CUDA), --compile
    stages = plan(args)
    out_dir = rank_run_dir(args, SCRIPT, resuming=resume is not None)   # torchrun: rank 0's, on every rank
    print(f"run directory: {out_dir}", flush=True)
    if resume is None:
        write_json(out_dir / "args.json", {**vars(args), "stages": [s._asdict() for s in stages], **run_info(device)})
    data = make_datasets(args, device)
    data["test_x"], data["test_y"] = data["test_x"][: args.eval_examples], data["test_y"][: args.eval_examples]
    model = place_model(build_model(data["num_classes"], data["mean"], data["std"], args.width, args.activation),
                        device)
    net = torch.compile(model) if args.compile else model   # forwards (same parameters); `model`: the state_dicts
    data_gen = torch.Generator().manual_seed(args.seed)       # shuffling + augmentation: the same on every rank
    broadcast_modules(model)                                  # torchrun: rank 0's initial model on every rank
    state = {"stage": 0, "epoch": 0, "step": 0, "results": {}, "train_s": {}, "wall_s": 0.0,
             "eps_table": load_eps_table(args.eps_table)}
    if resume is not None:   # D12: the run directory alone resumes the run (--init-ckpt is not read again)
        model.load_state_dict(resume["model"])
        state = {k: resume[k] for k in state}
        restore_rank_rng(resume["rng"], data_gen)
        truncate_log(out_dir / "log.jsonl", state["step"], resume.get("log_lines"))
    elif args.init_ckpt:
        load_weights(model, args.init_ckpt)
    warn_if_slow(model, data, args, stages, device)
    t_start = time.time() - state["wall_s"]

    for s_idx in range(state["stage"], len(stages)):
        st = stages[s_idx]
        optimizer = make_sgd(model.parameters(), device, args.lr, args.momentum, args.weight_decay)
        scheduler = make_schedule(optimizer, st.schedule, st.epochs * epoch_steps(data, args))
        sampler = make_sampler(st.sampler, st.weights, args)
        if resume is not None and s_idx == resume["stage"]:
            for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (sampler, "sampler")):
                obj.load_state_dict(resume[key]) if obj is not None else None
        elif st.name == "finetune":
            begin_finetune(net, data, st, args, state, out_dir)   # Eq. (11) calibration, the starting model's eval
        arms = partial(make_arms, st.attacks, dataset=args.dataset, eps_table=state["eps_table"], bf16=args.attack_bf16)
        train_arms = arms("train", steps=args.attack_steps)
        eval_arms = arms("eval", steps=args.eval_attack_steps or None)
        for epoch in range(state["epoch"], st.epochs):
            record, last = train_epoch(net, optimizer, scheduler, sampler, train_arms, st, data, data_gen, args,
                                       state, out_dir)
            sync_buffers(model)   # torchrun: one model on every rank before it is evaluated and saved
            check_ranks_agree(model, sampler.state_dict() if sampler else None)
            if (epoch + 1) % args.eval_every == 0 or last:
                state["results"][st.name] = evaluate_and_log(net, data, eval_arms, st, args, out_dir, record)
            else:
                log_epoch(out_dir, record)
            state.update(epoch=st.epochs if last else epoch + 1, wall_s=time.time() - t_start)
            save_checkpoint(out_dir / "ckpt.pt", {
                "format": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict() if sampler else None,
                "rng": capture_rank_rng(data_gen), "args": vars(args), **model_meta(args, data, st), **state,
                "log_lines": len((out_dir / "log.jsonl").read_text().splitlines()) if writes_here() else 0})
            if last:
                break
        if st.name == "pretrain" and st.epochs:   # a reusable l_p-robust starting point (--init-ckpt of later runs)
            save_checkpoint(out_dir / "pretrain_model.pt", {"format": 1, "model": model.state_dict(),
                                                            "args": vars(args), **model_meta(args, data, st)})
        state.update(stage=s_idx + 1, epoch=0)
    results = finish(model, data, stages[-1], args, state, out_dir, time.time() - t_start)
    end_distributed()
    return results


def warn_if_slow(model, data, args, stages, device):
    """On a CPU with real data: one line with the expected training time when it exceeds an hour (a timed
    forward+backward pass x (attack steps + 1) passes per iteration x iterations; evaluation not counted)."""
    if device.type != "cpu" or args.dataset == "fake":
        return
    x, y = to_float(data["train_x"][: args.batch_size]), data["train_y"][: args.batch_size]
    for _ in range(2):   # the second pass is timed (the first warms up)
        t0 = time.time()
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    iters = sum(st.epochs for st in stages) * math.ceil(len(data["train_y"]) / args.batch_size)
    hours = (time.time() - t0) * (args.attack_steps + 1) * min(iters, args.max_steps * len(stages) or iters) / 3600
    if hours > 1:
        print(f"warning: about {hours:.0f} h of training on this CPU (width {args.width}, {len(data['train_y'])} "
              f"images, {sum(st.epochs for st in stages)} epochs);\n  paper scale needs a GPU; a CPU-scale run: "
              f"--width 16 --train-subset 5000 --epochs 2 (README)", flush=True)


def begin_finetune(model, data, stage, args, state, out_dir):
    """Before Alg. 1: calibrate the semantic budgets (Eq. 11, --calibrate) on the first training images, then
    evaluate the starting model (epoch 0 of log.jsonl, "initial" of results.json)."""
    if args.calibrate:
        n = args.calib_examples
        state["eps_table"], report = calibrate(model, data["train_x"][:n], data["train_y"][:n], stage.attacks, args,
                                               state["eps_table"])
        write_json(out_dir / "eps_table.json", state["eps_table"])
        write_json(out_dir / "calibration.json", report)
    if stage.epochs:
        arms = make_arms(stage.attacks, "eval", args.dataset, args.eval_attack_steps or None, state["eps_table"],
                         args.attack_bf16)
        state["results"]["initial"] = evaluate_and_log(model, data, arms, stage, args, out_dir, {
            "kind": "epoch", "phase": stage.name, "epoch": 0, "step": state["step"]})


def train_epoch(model, optimizer, scheduler, sampler, arms, stage, data, data_gen, args, state, out_dir):
    """One pass over the shuffled, augmented training set, with a bandit log line every --log-every iterations.

    Returns the epoch's log record (time/train_s: the training loop alone) and whether the stage ends with it."""
    t0, seen, window = time.time(), [], []
    per_epoch = epoch_steps(data, args)
    epoch, stage_step = state["epoch"], state["epoch"] * per_epoch
    n_iter = min(per_epoch, args.max_steps - stage_step) if args.max_steps else per_epoch
    for x, y in iterate_batches(data["train_x"], data["train_y"], args.batch_size, data_gen, augment=data["augment"],
                                drop_last=args.compile):
        s = train_step(model, optimizer, x, y, arms, stage.weights, sampler, stage.beta, args.amp)
        scheduler.step()
        state["step"], stage_step = state["step"] + 1, stage_step + 1
        seen.append({**s, "n": len(y)})
        window.append(s)
        if args.interrupt_at_step and state["step"] == args.interrupt_at_step:
            print(f"--interrupt-at-step {args.interrupt_at_step}: simulated crash", flush=True)
            sys.exit(3)
        if len(seen) % args.log_every == 0 and len(seen) < n_iter:   # progress, with rate and ETA
            rate, left = len(seen) / (time.time() - t0), (args.max_steps or stage.epochs * per_epoch) - stage_step
            print(f"  {stage.name} epoch {epoch + 1}/{stage.epochs} | it {len(seen)}/{n_iter} | {rate:.2f} it/s | "
                  f"loss {sum(w['loss'] for w in seen[-args.log_every:]) / args.log_every:.3f} | ETA epoch "
                  f"{hms((n_iter - len(seen)) / rate)}, {stage.name} {hms(left / rate)}", flush=True)
        if sampler is not None and len(window) == args.log_every:
            append_jsonl(out_dir / "log.jsonl", {"kind": "bandit", "phase": stage.name, "epoch": epoch + 1,
                                                 "step": state["step"], **bandit_state(sampler, stage.attacks),
                                                 "train/loss": sum(w["loss"] for w in window) / len(window)})
            window = []
        if args.max_steps and stage_step >= args.max_steps:
            break
    n, train_s = sum(s["n"] for s in seen), time.time() - t0
    state["train_s"][stage.name] = state["train_s"].get(stage.name, 0.0) + train_s      # Table 2 (README D13)
    record = {"kind": "epoch", "phase": stage.name, "epoch": epoch + 1, "step": state["step"],
              "lr": optimizer.param_groups[0]["lr"], "train/loss": sum(s["loss"] * s["n"] for s in seen) / n,
              "train/loss_adv": sum(s["loss_adv"] * s["n"] for s in seen) / n, "time/train_s": train_s,
              **bandit_state(sampler, stage.attacks)}
    if sampler is not None:
        record.update({f"train/pulls/{a}": sum(s["arm"] == v for s in seen) for v, a in enumerate(stage.attacks)})
    return record, epoch + 1 == stage.epochs or bool(args.max_steps and stage_step >= args.max_steps)


def finish(model, data, stage, args, state, out_dir, wall_s):
    """model.pt (weights + what eval.py needs) and results.json: before/after, steps, Table 2's fine-tuning time."""
    save_checkpoint(out_dir / "model.pt", {"format": 1, "model": model.state_dict(), "args": vars(args),
                                           **model_meta(args, data, stage, state["eps_table"])})
    results = {"initial": state["results"].get("initial"), "final": state["results"].get("finetune"),
               "pretrain": state["results"].get("pretrain"), "steps": state["step"],
               "time/train_s": state["train_s"].get("finetune", 0.0),       # Table 2: fine-tuning time alone (D13)
               "time/pretrain_s": state["train_s"].get("pretrain", 0.0), "time/total_s": wall_s,
               "attacks": stage.attacks, "weights": stage.weights, "sampler": args.sampler,
               "eval_examples": len(data["test_y"]), "eps_table": state["eps_table"]}
    write_json(out_dir / "results.json", results)
    before, after = results["initial"] or {}, results["final"] or results["pretrain"] or {}   # pretraining only
    rows = [("clean", "clean"), ("avg robust", "avg_robust")] + [(n, n) for n in stage.attacks]
    get = lambda r, k: r.get("attacks", {}).get(k, r.get(k)) if r else None   # noqa: E731
    print(f"\ntest accuracy, first {len(data['test_y'])} test images (attacks at --eval-attack-steps "
          f"{args.eval_attack_steps}):\n{'':14s} {'before':>8s} {'after':>8s} {'change':>8s}", flush=True)
    for label, key in rows:
        b, a = get(before, key), get(after, key)
        cells = [f"{v:8.3f}" if v is not None else f"{'-':>8s}" for v in (b, a)]
        print(f"{label:14s} {' '.join(cells)} " + (f"{a - b:+8.3f}" if None not in (a, b) else ""), flush=True)
    print(f"done in {hms(wall_s)} (fine-tuning: {hms(results['time/train_s'])} of training): {out_dir}/results.json"
          f"\nfull evaluation of the model: python eval.py --ckpt {out_dir}/model.pt", flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Logging, checkpoints, resume. log.jsonl schema (README, "Logged metrics"): every line has kind ("epoch" | "bandit"),
# phase ("pretrain" | "finetune"), epoch (1-based: the epoch the line belongs to; 0 = the starting model) and step.
# ----------------------------------------------------------------------------------------------------------------

def bandit_state(sampler, names):
    """pi, cumulative pulls, R^self and R^tradeoff per arm (the sampling dynamics)."""
    if sampler is None:
        return {}
    rec, probs, (r_self, r_trade) = {}, sampler.probs(), sampler.rewards()
    for i, n in enumerate(names):
        rec.update({f"cas/arm_prob/{n}": probs[i], f"cas/pulls/{n}": sampler.pulls[i], f"cas/r_self/{n}": r_self[i],
                    f"cas/r_tradeoff/{n}": r_trade[i]})
    return rec


def evaluate_and_log(model, data, arms, stage, args, out_dir, record):
    """Robust accuracy on the fixed test subset (the first --eval-examples), one log.jsonl line, one console line."""
    t0 = time.time()
    # DEVIATION: per-epoch robust accuracy uses PGD / the attacks themselves, not AutoAttack (Sec. 5.1); eval.py runs
    # AutoAttack on the final model (README D8)
    res = evaluate(model, data["test_x"], data["test_y"], arms, args.batch_size, args.seed, world(), all_gather)
    agg = aggregate(res["attacks"], stage.weights, stage.attacks, scenario(args))
    accs = {f"test/acc/{n}": a for n, a in res["attacks"].items()}
    log_epoch(out_dir, {**record, "test/acc_clean": res["clean"], **accs, **{f"test/{k}": v for k, v in agg.items()},
                        "time/eval_s": time.time() - t0})
    return {"clean": res["clean"], "attacks": res["attacks"], **agg}


def log_epoch(out_dir, rec):
    """One log.jsonl line; on the console the epoch's line, then its per-attack test accuracies (wrapped)."""
    append_jsonl(out_dir / "log.jsonl", rec)
    train = f"train loss {rec['train/loss']:.3f} ({hms(rec['time/train_s'])})" if "train/loss" in rec else None
    parts = [f"{rec['phase']} epoch {rec['epoch']}", f"step {rec['step']}", train or "starting model"]
    if "test/acc_clean" in rec:
        parts += [f"clean {rec['test/acc_clean']:.3f}", f"avg robust {rec['test/avg_robust']:.3f}",
                  f"eval {hms(rec['time/eval_s'])}"]
    print(" | ".join(parts), flush=True)
    accs = " ".join(f"{k[len('test/acc/'):]} {v:.3f}" for k, v in rec.items() if k.startswith("test/acc/"))
    if accs:
        print(textwrap.fill(accs, 100, initial_indent="    ", subsequent_indent="    "), flush=True)


def hms(seconds):
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else (f"{m}m{s:02d}s" if m else f"{seconds:.1f}s")


def model_meta(args, data, stage, eps_table=None):
    return {"arch": "preact_resnet18", "width": args.width, "activation": args.activation,
            "num_classes": data["num_classes"], "dataset": args.dataset, "mean": list(data["mean"]),
            "std": list(data["std"]), "attacks": stage.attacks, "weights": stage.weights,
            "eps_table": dict(eps_table or {})}


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


# ==== BEGIN SHARED: cas-metrics (canonical: cas.py; copies: eval.py) ====
def scenario_weights(names, scenario):
    """Importance weights w_v of CAS Sec. 5.1: 6 for l_inf, l_2, l_1 (cifar) or snow, fog, blur (svhn), else 1."""
    heavy = {"cifar": ("linf", "l2", "l1"), "svhn": ("snow", "fog", "blur")}[scenario]
    return [6.0 if n in heavy else 1.0 for n in names]


def aggregate(acc, weights, names, scenario):
    """CAS Table 1 aggregates: weighted avg. Robust; avg. l_p / avg. Semantic (cifar) or avg. Corruption / Others."""
    out = {"avg_robust": sum(w * acc[n] for n, w in zip(names, weights)) / sum(weights) if names else float("nan")}
    group = ("linf", "l2", "l1") if scenario == "cifar" else ("snow", "fog", "blur")
    keys = ("avg_lp", "avg_semantic") if scenario == "cifar" else ("avg_corruption", "avg_others")
    inside, outside = [acc[n] for n in names if n in group], [acc[n] for n in names if n not in group]
    out[keys[0]] = sum(inside) / len(inside) if inside else float("nan")
    out[keys[1]] = sum(outside) / len(outside) if outside else float("nan")
    return out
# ==== END SHARED: cas-metrics ====


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
