"""CAS -- Calibrated Adversarial Sampling, reference implementation (with SAT, E-AT, Order and AVG baselines).

Fine-tunes an l_p-robust PreActResNet-18 against M attacks ("arms", any names of attacks.ATTACKS), choosing ONE
attack per mini-batch with a multi-armed bandit: UCB (Eq. 9) over a reward made of each arm's own loss trend
(Eq. 6) and its cross-attack trade-off (Eq. 7); the model takes one SGD step on the hybrid loss (Eq. 8).
Comments "Eq. (k)" and "Alg. 1, line n" refer to the CAS paper ("Calibrated Adversarial Sampling"); the spec
choices the paper leaves open are listed in README.md#caspy.

Without --init-ckpt the script first pre-trains the l_p-robust model (PGD-AT: l_inf for CIFAR-10, l_2 for
CIFAR-100/SVHN) for --pretrain-epochs, then fine-tunes for --epochs.

    python cas.py --dataset cifar10 --init-ckpt runs/pretrain/model.pt            # the paper's setting
    python cas.py --dataset cifar10                                               # pre-train, then CAS
    python cas.py --dataset fake --device cpu --width 8 --pretrain-epochs 1 --epochs 1 --max-steps 2 \
        --attack-steps 1 --eval-examples 8                                        # smoke test

Writes args.json, log.jsonl, ckpt.pt, model.pt, results.json into the run directory printed first
(README.md#outputs). `from cas import CASSampler` gives the bandit alone (the script runs only under __main__).
"""

import argparse
import inspect
import json
import math
import os
import random
import sys
import time
from collections import deque
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
from attacks import ATTACKS, DEFAULT_EPS, LP

SCRIPT = "cas"
SAMPLERS = ("cas", "sat", "eat", "order", "avg")


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_flags(parser)
    parser.set_defaults(epochs=10, lr=0.1)   # Sec. 5.1: 10 epochs of fine-tuning at initial lr 0.1
    g = parser.add_argument_group("CAS (Alg. 1)")
    g.add_argument("--sampler", type=str, default="cas", choices=SAMPLERS,
                   help="cas (Alg. 1) or a baseline: sat (pi ~ w), eat (E-AT), order (fixed weighted cycle), "
                        "avg (all arms every batch)")
    g.add_argument("--alpha", type=float, default=10.0, help="alpha, reward scale in Eq. (9) (Sec. 5.1)")
    g.add_argument("--beta", type=fraction, default=8 / 9, help="beta, adversarial weight of the hybrid loss Eq. (8)")
    g.add_argument("--window", type=int, default=10, help="W, sliding window of the slope in Eq. (6)")
    g.add_argument("--tradeoff", action=argparse.BooleanOptionalAction, default=True,
                   help="use R^tradeoff of Eq. (7) (--no-tradeoff: R = R^self, ablation)")
    g.add_argument("--ucb", action=argparse.BooleanOptionalAction, default=True,
                   help="add the UCB exploration term of Eq. (9) (--no-ucb: ablation)")
    g.add_argument("--scenario", type=str, default="auto", choices=("auto", "cifar", "svhn"),
                   help="importance weights w_v of Sec. 5.1 (auto: svhn for SVHN, else cifar)")
    g.add_argument("--schedule", type=str, default="cosine", choices=("cosine", "piecewise"),
                   help="fine-tuning lr schedule (the paper gives none; cosine to 0 per iteration)")
    g.add_argument("--eval-attack-steps", type=int, default=20,
                   help="steps of the l_p attacks in the per-epoch evaluation (other attacks: their defaults)")
    g.add_argument("--log-every", type=int, default=50, help="iterations per bandit log window (pi, N, R)")
    g.add_argument("--pretrain-epochs", type=int, default=100,
                   help="l_p PGD-AT epochs when no --init-ckpt is given (lr 0.1, /10 at 50%% and 75%%)")
    c = parser.add_argument_group("calibration of the semantic budgets (Eq. 11)")
    c.add_argument("--eps-table", type=str, default="",
                   help="JSON {attack: eps} overriding default budgets (e.g. eps_table.json of a --calibrate run)")
    c.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=False,
                   help="before fine-tuning, calibrate every semantic budget with Eq. (11) on the starting model")
    c.add_argument("--calib-lambda", type=float, default=0.6,
                   help="lambda_k of Eq. (11) (the paper gives no value; 0.6 grows eps when acc > 0.4, shrinks it below)")
    c.add_argument("--calib-range", type=float, nargs=2, default=(0.2, 0.6), metavar=("LO", "HI"),
                   help="target robust-accuracy range of the calibration (Sec. 5.1: 20%%-60%%)")
    c.add_argument("--calib-rounds", type=int, default=6, help="at most this many Eq. (11) updates per attack")
    c.add_argument("--calib-examples", type=int, default=500,
                   help="first N TRAINING images (no augmentation) used to calibrate, so the test subset stays unseen")
    e = parser.add_argument_group("experiments")
    e.add_argument("--tradeoff-matrix", action="store_true",
                   help="Figs. 3/6 instead of one run: fine-tune --init-ckpt on each attack of --attacks alone for "
                        "--epochs epochs, evaluate every attack on --eval-examples test images, write "
                        "tradeoff_matrix.json/.md (rerun the same command to continue an interrupted matrix)")
    e.add_argument("--tradeoff-sequential", action="store_true",
                   help="with --tradeoff-matrix: row k starts from row k-1's model and its changes are measured "
                        "against that model (the 'sequential fine-tuning' reading of Sec. 3), not from --init-ckpt")
    return parser


def get_args(argv=None):
    return make_parser().parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# The bandit (Sec. 4.2-4.3, Alg. 1) and the baselines, behind one interface: probs / sample / update / state_dict
# ----------------------------------------------------------------------------------------------------------------

LOSS_FLOOR = 1e-8     # losses are clamped below before log() (spec cas.md, Observations)
EXP_CLAMP = 50.0      # alpha * R is clamped to [-50, 50] before exp() so Eq. (9) never overflows


def slope(values):
    """Least-squares slope of values[j] against j = 0..n-1 (0 for fewer than 2 points)."""
    n = len(values)
    if n < 2:
        return 0.0
    j_mean = (n - 1) / 2
    v_mean = sum(values) / n
    num = sum((j - j_mean) * (v - v_mean) for j, v in enumerate(values))
    den = sum((j - j_mean) ** 2 for j in range(n))
    return num / den


class _Sampler:
    """Common parts: validated weights and a seeded generator (Python's random.Random, plain-type state)."""

    def __init__(self, weights, seed=0):
        self.w = [float(w) for w in weights]
        if not self.w or any(not (w > 0 and math.isfinite(w)) for w in self.w):
            raise ValueError(f"weights must be a non-empty sequence of positive floats, got {list(weights)!r}")
        self.M = len(self.w)
        self.rng = random.Random(seed)
        self.pulls = [0] * self.M                             # real pulls per arm (logged)

    def sample(self) -> int:
        """Draw an arm from pi (Alg. 1, line 9) with the sampler's own generator."""
        return self.rng.choices(range(self.M), weights=self.probs())[0]

    def update(self, arm, loss, correct=0, total=0):
        self.pulls[arm] += 1

    def rewards(self):
        return [0.0] * self.M, [0.0] * self.M

    def state_dict(self):
        return {"rng": _rng_to_list(self.rng.getstate()), "pulls": list(self.pulls)}

    def load_state_dict(self, d):
        self.rng.setstate(_rng_from_list(d["rng"]))
        self.pulls = list(d["pulls"])


class CASSampler(_Sampler):
    """Calibrated Adversarial Sampling: UCB over R = R^self + R^tradeoff (Eqs. 5-7, 9, 10; Alg. 1).

    Observations: update(arm, loss) with the mean adversarial CE of the pulled arm, measured before the SGD step.
    R^self uses the arm's OWN last W pulls (not global iterations, spec cas.md); R^tradeoff uses, for every other
    arm k, the pulls n_{v,k} of each arm v strictly between k's two most recent pulls (Alg. 1, line 14).
    """

    def __init__(self, weights, alpha=10.0, window=10, tradeoff=True, ucb=True, seed=0):
        super().__init__(weights, seed)
        if window < 2:
            raise ValueError(f"window must be >= 2 to fit a slope (Eq. 6), got {window!r}")
        self.alpha, self.window, self.tradeoff, self.ucb = float(alpha), int(window), bool(tradeoff), bool(ucb)
        self.N = [1] * self.M                                 # Sec. 4.3: N_v initialised to 1 (Alg. 1 says 0: 1/0)
        self.logL = [deque(maxlen=self.window) for _ in range(self.M)]   # log L of the arm's own last W pulls
        self.since = [[0] * self.M for _ in range(self.M)]    # since[k][j]: pulls of j since k's last pull
        self.between = [[0] * self.M for _ in range(self.M)]  # between[k][j] = n_{j,k} of Eq. (7)
        self.last_two = [[0.0, 0.0] for _ in range(self.M)]   # log L_k at t_prev, t_curr

    def update(self, arm, loss, correct=0, total=0):
        """Record the pulled arm's loss and the cross-type records (Alg. 1, lines 10 and 14)."""
        log_l = math.log(max(float(loss), LOSS_FLOOR))
        self.between[arm] = self.since[arm]                   # n_{j,arm}: pulls between its two latest pulls
        self.since[arm] = [0] * self.M
        for k in range(self.M):
            if k != arm:
                self.since[k][arm] += 1
        self.last_two[arm] = [self.last_two[arm][1], log_l]
        self.logL[arm].append(log_l)
        self.N[arm] += 1                                      # Alg. 1, line 10
        super().update(arm, loss)

    def rewards(self):
        """R^self (Eq. 6) and R^tradeoff (Eq. 7) per arm."""
        r_self = [-self.w[v] * slope(list(self.logL[v])) for v in range(self.M)]   # Eq. (6)
        r_trade = [0.0] * self.M
        if self.tradeoff:
            for k in range(self.M):
                total = sum(self.between[k])
                if self.pulls[k] < 2 or total == 0:           # k contributes 0 (spec: edge cases)
                    continue
                log_ratio = self.last_two[k][0] - self.last_two[k][1]   # log(L_k^(t_prev) / L_k^(t_curr))
                for v in range(self.M):
                    if v != k and self.between[k][v]:
                        r_trade[v] += self.w[k] * self.between[k][v] / total * log_ratio   # Eq. (7)
        return r_self, r_trade

    def probs(self):
        """pi of Eq. (10) from the scores of Eq. (9)."""
        r_self, r_trade = self.rewards()
        log_total = math.log(sum(self.N))
        scores = []
        for v in range(self.M):
            r = r_self[v] + r_trade[v]                                                  # Eq. (5)
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
        self.N = list(d["N"])
        self.logL = [deque(q, maxlen=self.window) for q in d["logL"]]
        self.since = [list(r) for r in d["since"]]
        self.between = [list(r) for r in d["between"]]
        self.last_two = [list(r) for r in d["last_two"]]


class SATSampler(_Sampler):
    """SAT (Madaan et al. 2021): a fixed pi_v proportional to w_v (uniform when all weights are 1)."""

    def probs(self):
        z = sum(self.w)
        return [w / z for w in self.w]


class EATSampler(_Sampler):
    """E-AT (Croce & Hein 2022): pi_v ~ (1 - r_v) w_v, r_v = cumulative robust accuracy of arm v's training attack.

    Until every arm has been pulled once, r_v = 0.5 for all (so pi ~ w), as in E-AT's train.py.
    """

    def __init__(self, weights, seed=0):
        super().__init__(weights, seed)
        self.correct, self.seen = [0] * self.M, [0] * self.M

    def update(self, arm, loss, correct=0, total=0):
        self.correct[arm] += int(correct)
        self.seen[arm] += int(total)
        super().update(arm, loss)

    def probs(self):
        if all(self.seen):
            q = [(1 - c / s) * w for c, s, w in zip(self.correct, self.seen, self.w)]
        else:
            q = [0.5 * w for w in self.w]
        if sum(q) <= 0:                        # every arm fully robust so far: fall back to pi ~ w
            q = list(self.w)
        z = sum(q)
        return [v / z for v in q]

    def state_dict(self):
        return {**super().state_dict(), "correct": list(self.correct), "seen": list(self.seen)}

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self.correct, self.seen = list(d["correct"]), list(d["seen"])


class OrderSampler(_Sampler):
    """Order: a fixed cycle in which arm v appears w_v times, repeated (weights rounded to integers >= 1).

    The cycle is interleaved: pass r visits, in arm order, every arm with w_v > r (e.g. weights 6,6,6,1,... give
    one pass over all arms followed by five passes over the three heavy arms).
    """

    def __init__(self, weights, seed=0):
        super().__init__(weights, seed)
        reps = [max(1, round(w)) for w in self.w]
        self.cycle = [v for r in range(max(reps)) for v in range(self.M) if reps[v] > r]
        self.pos = 0

    def probs(self):
        p = [0.0] * self.M
        p[self.cycle[self.pos % len(self.cycle)]] = 1.0
        return p

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


def _rng_to_list(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_list(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def make_sampler(args, weights):
    if args.sampler == "cas":
        return CASSampler(weights, alpha=args.alpha, window=args.window, tradeoff=args.tradeoff, ucb=args.ucb,
                          seed=args.seed)
    if args.sampler == "sat":
        return SATSampler(weights, seed=args.seed)
    if args.sampler == "eat":
        return EATSampler(weights, seed=args.seed)
    if args.sampler == "order":
        return OrderSampler(weights, seed=args.seed)
    return None   # avg: every arm on every batch


# ----------------------------------------------------------------------------------------------------------------
# Arms: which attack, at which budget and strength
# ----------------------------------------------------------------------------------------------------------------

def attack_kwargs(name, eps, steps, for_eval=False):
    """Keyword arguments of attack `name` at budget eps and (at most) `steps` steps.

    Training-time rule (spec cas.md, README "training-time attack strength"): l_p arms run `steps` steps with step
    size 2.5 eps / steps (the attacks' own default; APGD-l1 its sparse step); every other arm runs
    min(steps, its default steps), with its step size scaled so that steps x step size (the distance the latent can
    travel) equals its default. Evaluation (for_eval): l_p arms run `steps` steps (l1 with AutoAttack's evaluation
    sparsity 0.2), ppgd 40 iterations, every other arm its full default strength.
    """
    params = inspect.signature(ATTACKS[name]).parameters
    kw = {"eps": eps}
    if name in LP:
        kw["steps"] = steps
        if name == "l1" and for_eval:
            kw["sparsity"] = 0.2
        return kw
    if for_eval:
        if name == "ppgd":
            kw["steps"] = 40   # the evaluation setting of PPGD (Laidlaw et al.; 10 is its cheaper training default)
        return kw
    default_steps = params["steps"].default
    kw["steps"] = min(steps, default_steps)
    if "step_size" in params and isinstance(params["step_size"].default, (int, float)) and kw["steps"] > 0:
        kw["step_size"] = params["step_size"].default * default_steps / kw["steps"]
    return kw


def default_eps(name, dataset, eps_table=None):
    """The budget of arm `name`: an --eps-table entry, the dataset's l_p budget (Sec. 5.1) or the attack's default."""
    if eps_table and name in eps_table:
        return eps_table[name]
    table = DEFAULT_EPS.get(dataset, DEFAULT_EPS["cifar10"])
    return table.get(name, inspect.signature(ATTACKS[name]).parameters["eps"].default)


def make_arms(names, dataset, steps, for_eval=False, eps_table=None):
    """{name: attack(model, x, y) -> x_adv} closures at the given strength."""
    arms = {}
    for name in names:
        kw = attack_kwargs(name, default_eps(name, dataset, eps_table), steps, for_eval)
        arms[name] = (lambda fn, kw: (lambda model, x, y: fn(model, x, y, **kw)))(ATTACKS[name], kw)
    return arms


def load_eps_table(path):
    """--eps-table: JSON {attack: eps} with registered names and finite eps >= 0 (the format eval.py reads too)."""
    if not path:
        return {}
    table = json.loads(Path(path).read_text())
    if not isinstance(table, dict):
        raise ValueError(f"--eps-table {path}: expected a JSON object {{attack: eps}}, got {type(table).__name__}")
    attacks.registered(list(table))
    bad = {k: v for k, v in table.items() if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"--eps-table {path}: eps must be finite numbers >= 0, got {bad}")
    return {k: float(v) for k, v in table.items()}


def calibrate(model, x_u8, y, names, dataset, eps_table, args):
    """Eq. (11): eps_k <- (lambda_k + acc_adv[k]) * eps_k until acc_adv[k] lies in [lo, hi] (Sec. 5.1).

    Only the semantic arms are calibrated (the l_p budgets and PPGD's bound are the paper's fixed values). acc_adv is
    measured at full (evaluation) strength on the given images; at most --calib-rounds updates per attack.
    Returns the new table and a per-attack report {eps, acc, rounds, in_range, history}.
    """
    lo, hi = args.calib_range
    table, report = dict(eps_table), {}
    for name in [n for n in names if n in attacks.SEMANTIC]:
        eps, history = default_eps(name, dataset, table), []
        for r in range(args.calib_rounds + 1):
            arm = make_arms([name], dataset, args.eval_attack_steps, for_eval=True, eps_table={name: eps})
            acc = evaluate(model, x_u8, y, arm, args.batch_size, args.seed)["attacks"][name]
            history.append([eps, acc])
            if lo <= acc <= hi or r == args.calib_rounds:
                break
            eps = (args.calib_lambda + acc) * eps                     # Eq. (11)
        table[name] = eps
        report[name] = {"eps": eps, "acc": acc, "rounds": len(history) - 1, "in_range": lo <= acc <= hi,
                        "history": history}
        print(f"calibrate {name:13s} eps {history[0][0]:.4g} -> {eps:.4g} | robust acc {acc:.3f} "
              f"({'in' if lo <= acc <= hi else 'OUT OF'} range [{lo}, {hi}]) after {len(history) - 1} update(s)",
              flush=True)
    return table, report


# ----------------------------------------------------------------------------------------------------------------
# One training iteration
# ----------------------------------------------------------------------------------------------------------------

def hybrid_loss(model, x_adv, x, y, beta):
    """Eq. (8): beta * CE(f(x_adv), y) + (1 - beta) * CE(f(x), y); also returns the adversarial logits."""
    logits_adv = model(x_adv)
    loss_adv = F.cross_entropy(logits_adv, y)
    if beta < 1:
        loss = beta * loss_adv + (1 - beta) * F.cross_entropy(model(x), y)
    else:
        loss = loss_adv
    return loss, loss_adv, logits_adv


def train_step(model, optimizer, x, y, arms, names, sampler, weights, beta, amp):
    """One iteration of Alg. 1 (lines 9-14), or of AVG when sampler is None. Returns host-side stats.

    Exactly one host sync (the .tolist() of the loss and accuracy stats), as the spec requires.
    """
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)
    optimizer.zero_grad(set_to_none=True)
    if sampler is None:
        # AVG: sum_v w_v L_total(v) / sum_v w_v = beta * sum_v w_v CE_v / sum_v w_v + (1 - beta) * CE(f(x), y);
        # gradients are accumulated arm by arm (memory of one attack at a time), the clean term computed once
        stats, wsum = [], sum(weights)
        for name, w in zip(names, weights):
            model.eval()   # attacks are generated in eval mode (BN running stats frozen); README "Implementation details" #3
            x_adv = arms[name](model, x, y)
            model.train()
            with autocast:
                logits_adv = model(x_adv)
                loss_adv = F.cross_entropy(logits_adv, y)
            (beta * w / wsum * loss_adv).backward()
            stats.append(torch.stack([loss_adv.detach().float(), (logits_adv.argmax(1) == y).sum().float()]))
        loss_clean = torch.zeros((), device=x.device)
        if beta < 1:
            with autocast:
                loss_clean = F.cross_entropy(model(x), y)
            ((1 - beta) * loss_clean).backward()
        optimizer.step()
        s = torch.cat([torch.stack(stats).flatten(), loss_clean.detach().float().view(1)]).tolist()
        l_adv, correct = s[0:-1:2], s[1:-1:2]
        loss = beta * sum(l * w for l, w in zip(l_adv, weights)) / wsum + (1 - beta) * s[-1]
        return {"arm": -1, "loss": loss, "loss_adv": sum(l_adv) / len(l_adv), "correct_adv": sum(correct) / len(correct)}

    arm = sampler.sample()                                   # Alg. 1, line 9
    model.eval()   # attacks are generated in eval mode (BN running stats frozen); README "Implementation details" #3
    x_adv = arms[names[arm]](model, x, y)                    # Alg. 1, line 11
    model.train()
    with autocast:
        loss, loss_adv, logits_adv = hybrid_loss(model, x_adv, x, y, beta)   # Alg. 1, line 12
    loss.backward()
    optimizer.step()                                         # Alg. 1, line 13
    loss_v, loss_adv_v, correct = torch.stack(
        [loss.detach().float(), loss_adv.detach().float(), (logits_adv.argmax(1) == y).sum().float()]).tolist()
    sampler.update(arm, loss_adv_v, correct=int(correct), total=len(y))   # Alg. 1, line 14 (and N, line 10)
    return {"arm": arm, "loss": loss_v, "loss_adv": loss_adv_v, "correct_adv": correct}


def pretrain_step(model, optimizer, x, y, attack, amp):
    """Madry PGD-AT step (the l_p pre-training of Sec. 5.1): CE on the PGD example."""
    model.eval()   # attacks are generated in eval mode (BN running stats frozen); README "Implementation details" #3
    x_adv = attack(model, x, y)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    loss_v, correct = torch.stack([loss.detach().float(), (logits.argmax(1) == y).sum().float()]).tolist()
    return {"arm": -1, "loss": loss_v, "loss_adv": loss_v, "correct_adv": correct}


def make_schedule(optimizer, kind, total_steps):
    """Per-iteration lr schedule: cosine to 0, or piecewise (x0.1 at 50% and 75% of the steps, Rice et al.)."""
    total = max(total_steps, 1)
    if kind == "cosine":
        fn = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    else:
        fn = lambda s: 1.0 if s < 0.5 * total else (0.1 if s < 0.75 * total else 0.01)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# ----------------------------------------------------------------------------------------------------------------
# main: setup -> data -> model -> [pre-training phase] -> fine-tuning phase -> results
# ----------------------------------------------------------------------------------------------------------------

def main(args):
    resume = load_resume(args)                                # --resume continues with the checkpoint's args
    if resume is not None:
        # the run's own settings come from the checkpoint; where to run and the testing aid from this command line
        args = argparse.Namespace(**{**resume["args"], "resume": args.resume, "device": args.device,
                                     "interrupt_at_step": args.interrupt_at_step})
    check_args(args)
    seed_everything(args.seed, args.deterministic)
    device = pick_device(args.device)
    out_dir = make_run_dir(args, SCRIPT, resuming=resume is not None)
    print(f"run directory: {out_dir}", flush=True)
    names = attacks.registered(args.attacks) if args.attacks else [n for n in attacks.ALL if n in ATTACKS]
    scenario = args.scenario if args.scenario != "auto" else ("svhn" if args.dataset == "svhn" else "cifar")
    weights = scenario_weights(names, scenario)
    if resume is None:
        write_json(out_dir / "args.json", {**vars(args), "derived": {"attacks": names, "weights": weights,
                                                                     "scenario": scenario}, **run_info(device)})

    data = make_datasets(args, device)
    model = build_model(data["num_classes"], data["mean"], data["std"], args.width, args.activation).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if args.init_ckpt:
        load_weights(model, args.init_ckpt)
    test_x, test_y = data["test_x"][: args.eval_examples], data["test_y"][: args.eval_examples]
    eps_table = load_eps_table(args.eps_table)
    steps_per_epoch = math.ceil(len(data["train_y"]) / args.batch_size)
    phases = ([("pretrain", args.pretrain_epochs)] if not args.init_ckpt and args.pretrain_epochs > 0 else []) + \
        [("finetune", args.epochs)]
    data_gen = torch.Generator().manual_seed(args.seed)       # shuffling + augmentation, independent of the model

    state = {"phase": 0, "epoch": 0, "step": 0, "results": {}, "time_s": 0.0, "eps_table": eps_table}
    if resume is not None:
        model.load_state_dict(resume["model"])
        state = {k: resume[k] for k in state}
        restore_rng(resume["rng"], data_gen)
        truncate_log(out_dir / "log.jsonl", state["step"])    # drop lines written after the checkpoint
    t_start = time.time() - state["time_s"]

    for p_idx in range(state["phase"], len(phases)):
        phase, n_epochs = phases[p_idx]
        total_steps = n_epochs * steps_per_epoch
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        if phase == "pretrain":   # Madry PGD-AT: l_inf for CIFAR-10, l_2 for CIFAR-100 / SVHN (Sec. 5.1)
            pre_attack = "linf" if args.dataset in ("cifar10", "fake") else "l2"
            train_arms, train_names, sampler = make_arms([pre_attack], args.dataset, args.attack_steps), [pre_attack], None
            scheduler = make_schedule(optimizer, "piecewise", total_steps)
        else:
            if args.calibrate and not (resume is not None and p_idx == resume["phase"]):
                calib_x = data["train_x"][: args.calib_examples]
                state["eps_table"], report = calibrate(model, calib_x, data["train_y"][: args.calib_examples], names,
                                                       args.dataset, state["eps_table"], args)
                write_json(out_dir / "eps_table.json", state["eps_table"])
                write_json(out_dir / "calibration.json", report)
            eps_table = state["eps_table"]
            train_arms, train_names = make_arms(names, args.dataset, args.attack_steps, eps_table=eps_table), names
            sampler = make_sampler(args, weights)
            scheduler = make_schedule(optimizer, args.schedule, total_steps)
        first_epoch = 0
        if resume is not None and p_idx == resume["phase"]:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            if sampler is not None:
                sampler.load_state_dict(resume["sampler"])
            first_epoch = resume["epoch"]
        elif phase == "finetune":   # epoch 0 = the starting model, so results hold "before" and "after"
            eval_arms = make_arms(names, args.dataset, args.eval_attack_steps, for_eval=True, eps_table=eps_table)
            state["results"]["initial"] = evaluate_and_log(model, test_x, test_y, eval_arms, names, weights, scenario,
                                                           args, out_dir, {"phase": phase, "epoch": 0,
                                                                           "step": state["step"]})
            # the same starting model under the cheaper training-time attacks: does the training setting still attack?
            res = evaluate(model, test_x, test_y, train_arms, args.batch_size, args.seed)
            state["results"]["initial_train_strength"] = {"clean": res["clean"], "attacks": res["attacks"],
                                                          **aggregate(res["attacks"], weights, names, scenario)}
            print("starting model under the training-time attacks (--attack-steps "
                  f"{args.attack_steps}): " + " ".join(f"{n} {a:.3f}" for n, a in res["attacks"].items()), flush=True)
        phase_step = first_epoch * steps_per_epoch

        for epoch in range(first_epoch, n_epochs):
            t_epoch, window, epoch_stats = time.time(), [], []
            for x, y in iterate_batches(data["train_x"], data["train_y"], args.batch_size, data_gen,
                                        augment=data["augment"]):
                if phase == "pretrain":
                    s = pretrain_step(model, optimizer, x, y, train_arms[train_names[0]], args.amp)
                else:
                    s = train_step(model, optimizer, x, y, train_arms, train_names, sampler, weights, args.beta,
                                   args.amp)
                scheduler.step()
                state["step"] += 1
                phase_step += 1
                s["n"] = len(y)
                window.append(s)
                epoch_stats.append(s)
                if args.interrupt_at_step and state["step"] == args.interrupt_at_step:
                    print(f"--interrupt-at-step {args.interrupt_at_step}: simulated crash", flush=True)
                    sys.exit(3)
                if sampler is not None and len(window) == args.log_every:
                    append_jsonl(out_dir / "log.jsonl", bandit_log(window, sampler, names, state["step"], epoch))
                    window = []
                if args.max_steps and phase_step >= args.max_steps:
                    break
            record = {"phase": phase, "epoch": epoch + 1, "step": state["step"],
                      "lr": optimizer.param_groups[0]["lr"], **epoch_summary(epoch_stats, names, phase),
                      "time/epoch_s": time.time() - t_epoch}
            if phase == "finetune" and sampler is not None:
                record.update(bandit_log([], sampler, names, state["step"], epoch + 1))
            last = epoch + 1 == n_epochs or (args.max_steps and phase_step >= args.max_steps)
            if (epoch + 1) % args.eval_every == 0 or last:
                ev_names = names if phase == "finetune" else train_names
                ev_arms = make_arms(ev_names, args.dataset, args.eval_attack_steps, for_eval=True,
                                    eps_table=state["eps_table"])
                res = evaluate_and_log(model, test_x, test_y, ev_arms, ev_names, scenario_weights(ev_names, scenario),
                                       scenario, args, out_dir, record)
                state["results"][f"{phase}_last"] = res
            else:
                append_jsonl(out_dir / "log.jsonl", record)
            state.update(phase=p_idx, epoch=n_epochs if last else epoch + 1, time_s=time.time() - t_start)
            save_checkpoint(out_dir / "ckpt.pt", {
                "format": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict() if sampler else None,
                "rng": capture_rng(data_gen), "args": vars(args), **state, **model_meta(args, data, names, weights)})
            if last:
                break
        if phase == "pretrain":   # a reusable l_p-robust starting point (--init-ckpt of later runs)
            save_checkpoint(out_dir / "pretrain_model.pt", {"format": 1, "model": model.state_dict(),
                                                            "args": vars(args), **model_meta(args, data, [pre_attack],
                                                                                              [1.0])})
        resume = None
        state.update(phase=p_idx + 1, epoch=0)

    wall = time.time() - t_start
    save_checkpoint(out_dir / "model.pt", {"format": 1, "model": model.state_dict(), "args": vars(args),
                                           **model_meta(args, data, names, weights, state["eps_table"])})
    results = {"initial": state["results"].get("initial"), "final": state["results"].get("finetune_last"),
               "initial_train_strength": state["results"].get("initial_train_strength"),
               "pretrain": state["results"].get("pretrain_last"), "steps": state["step"],
               "time/total_s": wall, "attacks": names, "weights": weights, "sampler": args.sampler,
               "eval_examples": len(test_y), "eps_table": state["eps_table"]}
    write_json(out_dir / "results.json", results)
    print(f"done in {wall:.1f}s: {out_dir / 'results.json'}", flush=True)
    return results


def tradeoff_matrix(args):
    """Figs. 3/6: D[k][j] = acc_j(start fine-tuned on attack k alone) - acc_j(start), and the sum of D.

    Every row is an ordinary single-arm run (rows/<k>/, resumable) from the same --init-ckpt with the same settings;
    all attacks are evaluated at evaluation strength on the first --eval-examples test images, the start once.
    tradeoff_matrix.json is rewritten after every row, so rerunning the command continues where it stopped.
    """
    if not args.init_ckpt:
        raise ValueError("--tradeoff-matrix fine-tunes a pre-trained model: give it with --init-ckpt")
    check_args(args)
    device = pick_device(args.device)
    names = attacks.registered(args.attacks) if args.attacks else [n for n in attacks.ALL if n in ATTACKS]
    if not args.out_dir:
        args.out_dir = str(Path("runs") / SCRIPT / f"tradeoff-{args.dataset}-s{args.seed}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tradeoff_matrix.json"
    mat = json.loads(path.read_text()) if path.exists() else {"attacks": names, "sequential": args.tradeoff_sequential,
                                                              "start": None, "rows": {}}
    mat.setdefault("sequential", False)
    if mat["attacks"] != names or mat["sequential"] != args.tradeoff_sequential:
        raise ValueError(f"{path} was made for --attacks {','.join(mat['attacks'])} (sequential "
                         f"{mat['sequential']}), not {','.join(names)} (sequential {args.tradeoff_sequential}); "
                         f"use another --out-dir")
    seed_everything(args.seed, args.deterministic)
    data = make_datasets(args, device)
    model = build_model(data["num_classes"], data["mean"], data["std"], args.width, args.activation).to(device)
    test_x, test_y = data["test_x"][: args.eval_examples], data["test_y"][: args.eval_examples]
    eps_table = load_eps_table(args.eps_table)
    eval_arms = make_arms(names, args.dataset, args.eval_attack_steps, for_eval=True, eps_table=eps_table)

    def evaluate_all(weights_path):
        load_weights(model, weights_path)
        res = evaluate(model, test_x, test_y, eval_arms, args.batch_size, args.seed)
        return {"clean": res["clean"], "attacks": res["attacks"]}

    if mat["start"] is None:
        mat["start"] = evaluate_all(args.init_ckpt)
        write_json(path, mat)
    for i, k in enumerate(names):
        if k in mat["rows"]:
            continue
        # independent rows start from --init-ckpt; sequential rows from the previous row's model
        chained = args.tradeoff_sequential and i > 0
        start_ckpt = out_dir / "rows" / names[i - 1] / "model.pt" if chained else args.init_ckpt
        before = mat["rows"][names[i - 1]] if chained else mat["start"]
        row_dir = out_dir / "rows" / k
        if not (row_dir / "model.pt").exists():
            resume = str(row_dir) if (row_dir / "ckpt.pt").exists() else ""
            row_args = argparse.Namespace(**{**vars(args), "attacks": k, "sampler": "sat", "calibrate": False,
                                             "tradeoff_matrix": False, "init_ckpt": str(start_ckpt),
                                             "out_dir": str(row_dir), "resume": resume})
            main(row_args)
        res = evaluate_all(row_dir / "model.pt")
        res["delta"] = {j: res["attacks"][j] - before["attacks"][j] for j in names}
        res["time/total_s"] = json.loads((row_dir / "results.json").read_text())["time/total_s"]
        mat["rows"][k] = res
        mat["sum"] = sum(sum(r["delta"].values()) for r in mat["rows"].values())
        write_json(path, mat)
        (out_dir / "tradeoff_matrix.md").write_text(tradeoff_markdown(mat, args))
        print(f"trade-off row {k}: sum of accuracy changes {sum(res['delta'].values()):+.3f}", flush=True)
    print(f"trade-off matrix ({len(mat['rows'])}/{len(names)} rows): sum {mat.get('sum', 0.0):+.3f} -> "
          f"{out_dir / 'tradeoff_matrix.md'}", flush=True)
    return mat


def tradeoff_markdown(mat, args):
    """Rows: the attack fine-tuned on; columns: the attack evaluated; entries: accuracy change in points."""
    names = mat["attacks"]
    start = ("the previous row's model (sequential, the first row from " if mat["sequential"] else "") + \
        f"`{args.init_ckpt}`" + (")" if mat["sequential"] else "")
    lines = [f"Trade-off matrix (CAS Figs. 3/6): change of robust accuracy (percentage points) on the first "
             f"{args.eval_examples} {args.dataset} test images after {args.epochs} epoch(s) of fine-tuning "
             f"{start} on one attack (row) alone; columns: the attack evaluated.", "",
             "| trained on \\ evaluated on | " + " | ".join(names) + " | row sum |",
             "|---" * (len(names) + 2) + "|",
             "| (start accuracy, %) | " + " | ".join(f"{100 * mat['start']['attacks'][j]:.1f}" for j in names) + " | |"]
    for k in [n for n in names if n in mat["rows"]]:   # the JSON keeps keys sorted; the table keeps --attacks order
        d = mat["rows"][k]["delta"]
        lines.append(f"| {k} | " + " | ".join(f"{100 * d[j]:+.1f}" for j in names) + f" | {100 * sum(d.values()):+.1f} |")
    lines += ["", f"Sum of the matrix: {100 * mat.get('sum', 0.0):+.1f} points over {len(mat['rows'])} of "
                  f"{len(names)} rows."]
    return "\n".join(lines) + "\n"


def check_args(args):
    """Clear errors for bad flag values (argparse handles the choices)."""
    if not 0.0 <= args.beta <= 1.0:
        raise ValueError(f"--beta must lie in [0, 1] (Eq. 8), got {args.beta!r}")
    for flag in ("batch_size", "eval_examples", "log_every", "eval_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)!r}")
    if args.window < 2:
        raise ValueError(f"--window must be >= 2 (a slope needs two points, Eq. 6), got {args.window!r}")
    if args.attacks:
        attacks.registered(args.attacks)


def bandit_log(window, sampler, names, step, epoch):
    """One log line per window: pi, N, R^self, R^tradeoff per arm (the sampling dynamics) and the window's loss."""
    rec = {"kind": "bandit", "step": step, "epoch": epoch}
    if window:
        rec["train/loss"] = sum(s["loss"] for s in window) / len(window)
    probs = sampler.probs()
    r_self, r_trade = sampler.rewards()
    for v, n in enumerate(names):
        rec[f"cas/arm_prob/{n}"] = probs[v]
        rec[f"cas/pulls/{n}"] = sampler.pulls[v]
        rec[f"cas/r_self/{n}"] = r_self[v]
        rec[f"cas/r_tradeoff/{n}"] = r_trade[v]
    return rec


def epoch_summary(stats, names, phase):
    n = sum(s["n"] for s in stats)
    rec = {"train/loss": sum(s["loss"] * s["n"] for s in stats) / max(n, 1),
           "train/loss_adv": sum(s["loss_adv"] * s["n"] for s in stats) / max(n, 1),
           "train/acc_adv": sum(s["correct_adv"] for s in stats) / max(n, 1)}
    if phase == "finetune" and stats and stats[0]["arm"] >= 0:
        for v, name in enumerate(names):
            rec[f"train/pulls/{name}"] = sum(1 for s in stats if s["arm"] == v)
    return rec


def evaluate_and_log(model, x, y, arms, names, weights, scenario, args, out_dir, record):
    """Per-epoch robust accuracy on the fixed test subset; one console line and one log.jsonl line."""
    t0 = time.time()
    res = evaluate(model, x, y, arms, args.batch_size, args.seed)
    agg = aggregate(res["attacks"], weights, names, scenario)
    record = {**record, "test/acc_clean": res["clean"], **{f"test/acc/{n}": a for n, a in res["attacks"].items()},
              **{f"test/{k}": v for k, v in agg.items()}, "time/eval_s": time.time() - t0}
    append_jsonl(out_dir / "log.jsonl", record)
    per = " ".join(f"{n} {a:.3f}" for n, a in res["attacks"].items())
    train = f"train loss {record['train/loss']:.3f} | " if "train/loss" in record else "starting model | "
    print(f"{record['phase']} epoch {record['epoch']} | step {record['step']} | {train}test clean {res['clean']:.3f} "
          f"{per} | avg robust {agg['avg_robust']:.3f} | {record.get('time/epoch_s', 0):.1f}s", flush=True)
    return {"clean": res["clean"], "attacks": res["attacks"], **agg}


def model_meta(args, data, names, weights, eps_table=None):
    return {"arch": "preact_resnet18", "width": args.width, "activation": args.activation,
            "num_classes": data["num_classes"], "dataset": args.dataset, "mean": list(data["mean"]),
            "std": list(data["std"]), "attacks": names, "weights": weights, "eps_table": dict(eps_table or {})}


def load_resume(args):
    if not args.resume:
        return None
    path = Path(args.resume)
    path = path / "ckpt.pt" if path.is_dir() else path
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt or "args" not in ckpt:
        raise ValueError(f"--resume expects a ckpt.pt written by {SCRIPT}.py, got {path} (keys {sorted(ckpt)})")
    ckpt["args"]["out_dir"] = str(path.parent)
    return ckpt


def capture_rng(data_gen):
    rng = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng, data_gen):
    torch.set_rng_state(rng["torch"])
    data_gen.set_state(rng["data"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def truncate_log(path, step):
    """On resume, keep only log lines up to the checkpoint's step (later ones are re-written identically)."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in lines))
    os.replace(tmp, path)


# ==== BEGIN SHARED: common-flags (canonical: cas.py; identical in caat_meta.py, caat_reinforce.py; tests/test_copies.py) ====
def fraction(s: str) -> float:
    """argparse type that accepts fractions: --eps 8/255."""
    try:
        return float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {s!r}")


def add_common_flags(parser):
    g = parser.add_argument_group("common")
    g.add_argument("--dataset", type=str, default="cifar10", choices=("cifar10", "cifar100", "svhn", "fake"),
                   help="fake: seeded random 32x32 tensors for tests (no files needed)")
    g.add_argument("--data-dir", type=str, default="./data", help="where the dataset files are (or are downloaded to)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download missing dataset files (md5-checked archives)")
    g.add_argument("--train-subset", type=int, default=0, help="use the first N training images (0 = all)")
    g.add_argument("--test-subset", type=int, default=0, help="use the first N test images (0 = all)")
    g.add_argument("--out-dir", type=str, default="", help="run directory (default runs/<script>/<dataset>-s<seed>-<time>)")
    g.add_argument("--epochs", type=int, default=10, help="epochs of the method")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--seed", type=int, default=0, help="one seed drives everything")
    g.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="deterministic cuDNN / algorithms (slower; CPU runs are deterministic anyway)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast for the training forward/backward (attacks stay fp32)")
    g.add_argument("--resume", type=str, default="", help="run directory or ckpt.pt of the SAME run to continue")
    g.add_argument("--init-ckpt", type=str, default="", help="weights to start from (model.pt or a plain state_dict)")
    g.add_argument("--max-steps", type=int, default=0, help="stop each phase after N optimizer steps (0 = no limit)")
    g.add_argument("--interrupt-at-step", type=int, default=0,
                   help="testing aid: exit with status 3 right after optimizer step N, as if killed")
    g.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations on the test subset")
    g.add_argument("--eval-examples", type=int, default=1000, help="first N test images for per-epoch robust accuracy")
    g.add_argument("--attacks", type=str, default="", help="comma list of attacks.ATTACKS names (default: all registered)")
    g.add_argument("--attack-steps", type=int, default=10, help="inner steps of every training-time attack")
    g.add_argument("--width", type=int, default=64, help="base width of PreActResNet-18 (64 = the paper; tests use 8)")
    g.add_argument("--activation", type=str, default="relu", choices=("relu", "softplus"),
                   help="block activation (softplus: E-AT's released weights)")
    g.add_argument("--input-norm", type=str, default="dataset", choices=("dataset", "none"),
                   help="mean/std inside the model: the dataset's, or none (E-AT's weights expect raw [0,1] input)")
    return parser
# ==== END SHARED: common-flags ====


# ==== BEGIN SHARED: setup (canonical: cas.py; identical in caat_meta.py, caat_reinforce.py, eval.py; tests/test_copies.py) ====
def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)                      # seeds the CPU and every CUDA device
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:                            # slower; see PyTorch's "Reproducibility" notes
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)


def pick_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def make_run_dir(args, script: str, resuming: bool = False) -> Path:
    """Create (or, when resuming, reuse) the run directory; never overwrite another run's files."""
    if not args.out_dir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out_dir = str(Path("runs") / script / f"{args.dataset}-s{args.seed}-{stamp}")
    out = Path(args.out_dir)
    if not resuming and (out / "ckpt.pt").exists():
        raise FileExistsError(f"{out} already holds a run (ckpt.pt); continue it with --resume {out} "
                              f"or choose another --out-dir")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_info(device: torch.device) -> dict:
    """Versions and machine facts recorded in args.json."""
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "start_time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    try:
        import subprocess
        info["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                     cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git"] = ""
    return info
# ==== END SHARED: setup ====


# ==== BEGIN SHARED: model (canonical: cas.py; identical in caat_meta.py, caat_reinforce.py, eval.py; tests/test_copies.py) ====
class Normalize(nn.Module):
    """(x - mean) / std with non-persistent buffers: no state_dict entries, so published weights load as they are."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016) as in Rice et al. 2020 / E-AT: bn1-act-conv1-bn2-act-conv2 + skip.

    The projection shortcut (1x1 conv, when the shape changes) takes the activated input, the identity the raw one.
    """

    def __init__(self, in_planes, planes, stride, act):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.act = act
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = self.act(self.bn1(x))
        skip = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(self.act(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """PreActResNet-18 with the layer names of Rice et al. / E-AT (conv1, layer1..4, bn, linear).

    Input in [0, 1]; normalisation is the first module (no state_dict entries). Final bn -> ReLU -> 4x4 average
    pool -> linear (ReLU even with softplus blocks, as E-AT). width 64 = the standard model (64-128-256-512).
    """

    def __init__(self, num_classes=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), width=64, activation="relu"):
        super().__init__()
        if activation not in ("relu", "softplus"):
            raise ValueError(f"unknown activation {activation!r}; choose from relu, softplus")
        act = nn.ReLU() if activation == "relu" else nn.Softplus(beta=1.0)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        planes, layers = width, []
        for i, stride in enumerate((1, 2, 2, 2)):
            out = width * 2 ** i
            layers.append(nn.Sequential(PreActBlock(planes, out, stride, act), PreActBlock(out, out, 1, act)))
            planes = out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)

    def features(self, x):
        """Outputs of layer1..layer4 (pre-activation sums), for ppgd's "self" perceptual distance."""
        out = self.conv1(self.normalize(x))
        feats = []
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
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state_dict (expected a dict of tensors, or a checkpoint with a 'model' "
                         f"or 'state_dict' entry); got {type(obj).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_weights(model, path):
    """Load a checkpoint's weights into `model` strictly, with a clear error on missing/unexpected/mis-shaped keys."""
    sd = extract_state_dict(load_checkpoint(path), path)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not fit this PreActResNet-18 (check --width/--activation/dataset):\n"
                         f"  missing keys: {missing[:10]}{' ...' if len(missing) > 10 else ''}\n"
                         f"  unexpected keys: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}\n"
                         f"  shape mismatches: {shapes[:10]}")
    model.load_state_dict(sd)
    return model


def build_model_from_ckpt(path, device="cpu", width=None, activation=None, num_classes=None, mean=None, std=None):
    """Rebuild a model from a model.pt / ckpt.pt (metadata) or a plain state_dict (pass width etc.); eval mode."""
    ckpt = load_checkpoint(path)
    meta = ckpt if isinstance(ckpt, dict) and "arch" in ckpt else {}
    if meta and meta["arch"] != "preact_resnet18":
        raise ValueError(f"{path}: unknown arch {meta['arch']!r}; this code builds preact_resnet18")
    model = build_model(num_classes or meta.get("num_classes", 10), mean or meta.get("mean", (0.0, 0.0, 0.0)),
                        std or meta.get("std", (1.0, 1.0, 1.0)), width or meta.get("width", 64),
                        activation or meta.get("activation", "relu"))
    load_weights(model, path)
    return model.to(device).eval()
# ==== END SHARED: model ====


# ==== BEGIN SHARED: data (canonical: cas.py; identical in caat_meta.py, caat_reinforce.py, eval.py; tests/test_copies.py) ====
# name -> classes, mean, std, files (relative to --data-dir), archive/url + md5 used to download them
DATASETS = {
    "cifar10": dict(num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616), augment="crop_flip",
                    files=["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/data_batch_2",
                           "cifar-10-batches-py/data_batch_3", "cifar-10-batches-py/data_batch_4",
                           "cifar-10-batches-py/data_batch_5", "cifar-10-batches-py/test_batch"],
                    urls=[("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")]),
    "cifar100": dict(num_classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), augment="crop_flip",
                     files=["cifar-100-python/train", "cifar-100-python/test"],
                     urls=[("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")]),
    "svhn": dict(num_classes=10, mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), augment="crop",
                 files=["train_32x32.mat", "test_32x32.mat"],
                 urls=[("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d0373"),
                       ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")]),
    "fake": dict(num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augment="crop_flip", files=[], urls=[]),
}
FAKE_SIZES = (256, 64)   # train / test images of --dataset fake


def ensure_files(name, root, download):
    """Make sure the dataset files exist under root; download them if allowed, else raise a clear error."""
    spec = DATASETS[name]
    missing = [f for f in spec["files"] if not (root / f).exists()]
    if not missing:
        return
    if download:
        try:
            from torchvision.datasets.utils import download_and_extract_archive, download_url
            for url, md5 in spec["urls"]:
                if url.endswith(".tar.gz"):
                    download_and_extract_archive(url, str(root), md5=md5)
                else:
                    download_url(url, str(root), md5=md5)
            missing = [f for f in spec["files"] if not (root / f).exists()]
        except Exception as e:   # offline, proxy, disk: report it with the files the user must provide
            raise FileNotFoundError(f"{name}: could not download ({type(e).__name__}: {e}). Put these files under "
                                    f"--data-dir {root}: {', '.join(spec['files'])} (from {spec['urls'][0][0]})") from e
    if missing:
        raise FileNotFoundError(f"{name}: missing {', '.join(missing)} under --data-dir {root}; download them from "
                                f"{', '.join(u for u, _ in spec['urls'])} (or drop --no-download)")


def read_split(name, root, train):
    """(uint8 images (N, 3, 32, 32), int64 labels (N,)) read from the standard files (no md5 check of the files)."""
    import pickle
    if name in ("cifar10", "cifar100"):
        if name == "cifar10":
            files = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)] if train else ["cifar-10-batches-py/test_batch"]
        else:
            files = ["cifar-100-python/train" if train else "cifar-100-python/test"]
        xs, ys = [], []
        for f in files:
            with open(root / f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"] if b"labels" in d else d[b"fine_labels"], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    from scipy.io import loadmat   # svhn: X (32, 32, 3, N), y (N, 1) with label 10 for the digit 0
    d = loadmat(str(root / ("train_32x32.mat" if train else "test_32x32.mat")))
    x = torch.from_numpy(np.ascontiguousarray(d["X"].transpose(3, 2, 0, 1)))
    y = torch.from_numpy(d["y"].astype(np.int64).reshape(-1) % 10)
    return x, y


def fake_split(n, seed, num_classes=10):
    """Seeded, learnable random images: a per-class colour and stripe pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    base = torch.rand(num_classes, 3, 1, 1, generator=g) * 0.6 + 0.2
    stripes = torch.sin(torch.arange(32.0) * (y.float()[:, None] + 1) * 0.4)[:, None, None, :] * 0.15
    x = base[y] + stripes + 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def make_datasets(args, device):
    """Whole train/test sets as uint8 tensors on `device` (augmentation happens batched on the device)."""
    spec = DATASETS[args.dataset]
    if args.dataset == "fake":
        (tx, ty), (vx, vy) = fake_split(FAKE_SIZES[0], 0), fake_split(FAKE_SIZES[1], 1)
    else:
        root = Path(args.data_dir)
        ensure_files(args.dataset, root, args.download)
        (tx, ty), (vx, vy) = read_split(args.dataset, root, True), read_split(args.dataset, root, False)
    if args.train_subset:
        tx, ty = tx[: args.train_subset], ty[: args.train_subset]
    if args.test_subset:
        vx, vy = vx[: args.test_subset], vy[: args.test_subset]
    mean, std = (spec["mean"], spec["std"]) if args.input_norm == "dataset" else ((0.0,) * 3, (1.0,) * 3)
    return {"train_x": tx.to(device), "train_y": ty.to(device), "test_x": vx.to(device), "test_y": vy.to(device),
            "num_classes": spec["num_classes"], "mean": mean, "std": std, "augment": spec["augment"]}


def to_float(x_u8):
    return x_u8.float().div_(255.0)


def augment_batch(x, generator, kind, pad=4):
    """Random crop (zero padding `pad`) and, for kind 'crop_flip', horizontal flip, batched on x's device."""
    b, _, h, w = x.shape
    offs = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    flip = torch.rand(b, generator=generator).to(x.device) < 0.5
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (offs[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]   # (B, 1, H, 1)
    cols = offs[1][:, None] + torch.arange(w, device=x.device)                       # (B, W)
    if kind == "crop_flip":
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    cols = cols[:, None, None, :]                                                     # (B, 1, 1, W)
    bidx = torch.arange(b, device=x.device)[:, None, None, None]
    cidx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[bidx, cidx, rows, cols]


def iterate_batches(x_u8, y, batch_size, generator=None, augment=None):
    """Yield float [0,1] batches; shuffled and augmented when a generator is given, else in order."""
    n = len(y)
    order = torch.randperm(n, generator=generator).to(y.device) if generator is not None else torch.arange(n, device=y.device)
    for i in range(0, n, batch_size):
        idx = order[i: i + batch_size]
        xb = to_float(x_u8[idx])
        if generator is not None and augment:
            xb = augment_batch(xb, generator, augment)
        yield xb, y[idx]
# ==== END SHARED: data ====


# ==== BEGIN SHARED: evaluate (canonical: cas.py; identical in caat_meta.py, caat_reinforce.py, eval.py; tests/test_copies.py) ====
def evaluate(model, x_u8, y, attack_fns, batch_size, seed):
    """Clean accuracy and accuracy under each attack (dict name -> fn(model, x, y) -> x_adv) on (x_u8, y).

    The model is in eval mode throughout (its mode is restored after). The RNG is forked and re-seeded before each
    attack, so a result depends neither on the training RNG nor on which other attacks ran. Also returns the
    per-example correctness (for union / class-wise metrics).
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


def scenario_weights(names, scenario):
    """Importance weights w_v of CAS Sec. 5.1: 6 for l_inf, l_2, l_1 (cifar) or snow, fog, blur (svhn), else 1."""
    heavy = {"cifar": ("linf", "l2", "l1"), "svhn": ("snow", "fog", "blur")}
    if scenario not in heavy:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {sorted(heavy)}")
    return [6.0 if n in heavy[scenario] else 1.0 for n in names]


def aggregate(acc, weights, names, scenario):
    """CAS Table 1 aggregates: weighted avg. Robust; avg. l_p / avg. Semantic (cifar) or avg. Corruption / Others."""
    out = {"avg_robust": sum(w * acc[n] for n, w in zip(names, weights)) / sum(weights) if names else float("nan")}
    group = ("linf", "l2", "l1") if scenario == "cifar" else ("snow", "fog", "blur")
    keys = ("avg_lp", "avg_semantic") if scenario == "cifar" else ("avg_corruption", "avg_others")
    inside = [acc[n] for n in names if n in group]
    outside = [acc[n] for n in names if n not in group]
    out[keys[0]] = sum(inside) / len(inside) if inside else float("nan")
    out[keys[1]] = sum(outside) / len(outside) if outside else float("nan")
    return out
# ==== END SHARED: evaluate ====


# ==== BEGIN SHARED: io (canonical: cas.py; identical in caat_meta.py, caat_reinforce.py, eval.py; tests/test_copies.py) ====
def write_json(path, obj):
    """Atomic JSON write (temp file + os.replace): a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def save_checkpoint(path, obj):
    """Atomic torch.save: write path.tmp, then os.replace (a kill at any moment leaves the old or the new file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
    args = get_args()
    tradeoff_matrix(args) if args.tradeoff_matrix else main(args)
