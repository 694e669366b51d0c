"""eval.py -- robustness evaluation of any model: every registered attack, AutoAttack and the papers' tables.

    python eval.py --ckpt runs/cas/cifar10-s0-.../model.pt                   # all attacks at the "medium" level
    python eval.py --ckpt model.pt --attacks linf,l2,l1,fog --autoattack linf,l2,l1 --n-examples 1000
    python eval.py --ckpt their.pt                  # any PreActResNet-18 state_dict: width, classes from the weights
    python eval.py --ckpt eat.pt --activation softplus --input-norm none       # E-AT's weights
    python eval.py --ckpt wrn.pt --arch mypkg.nets:WideResNet --arch-kwargs '{"depth": 28}'   # any architecture
    python eval.py --compare a/eval.json b/eval.json --labels SAT,CAS | --aggregate runs/t1/*/s*/eval.json --out t1.md
    python eval.py --tradeoff start.json rows/*/eval.json --out matrix.md     # CAS Figs. 3/6
    torchrun --standalone --nproc_per_node 8 eval.py --ckpt model.pt          # batches shared out over 8 GPUs

From Python, any nn.Module (options: the flags' names; files are written only with out=... or ckpt=...):

    import eval as ev
    res = ev.evaluate_model(my_model, dataset="cifar10", attacks="linf,fog", autoattack="linf", n_examples=500)
    print(res["clean_acc"], res["attacks"]["linf"]["acc"], res["avg_robust"], res["union_acc"])

Input convention (AutoAttack's, RobustBench's): a model receives images in [0, 1] and normalises them itself (ours
carry a Normalize layer; --input-norm applies to our PreActResNet-18 only). Evaluates the FIRST --n-examples test
images in eval mode: accuracy clean and under each attack at full strength (attacks.attack_settings), the CAS
aggregates (Table 1, Sec. 5.1), union accuracy, AutoAttack, CAAT's class-wise errors (Eqs. 45-48). The RNG is
re-seeded before every batch of every attack (so N torchrun ranks write what one process writes); every adversarial
batch is sanity-checked (AutoAttack-style). eval.json (schema:
README.md#evalpy) and eval.md are rewritten atomically after every attack (--resume skips finished ones).
"""

import argparse
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import attacks
from attacks import ATTACKS, DEFAULT_EPS, attack_settings, load_eps_table
from attacks.autoattack import cost as aa_cost

FORMAT, GROUPS, NORMS = 1, ("attacks", "pgd", "autoattack"), ("linf", "l2", "l1")
P = {"linf": math.inf, "l2": 2.0, "l1": 1.0}
CAAT_EPS, CAAT_STEP = 8 / 255, 2 / 255   # CAAT Sec. 6.1 (FRL's setting): PGD eps 8/255, step 2/255, 10 / 20 steps
# Sanity-check tolerances: [0, 1] exact (as AutoAttack's check); l_p budget: relative 1e-5 (float32 projections, as
# attacks/autoattack.py's re-check) plus the p-norm of one ulp of [0, 1] values per pixel, d^(1/p) * 2^-23; LPIPS
# (ppgd): relative 1e-3 (the distance is recomputed from features; batched kernels may differ in the last bits).
BUDGET_RTOL, ULP, LPIPS_RTOL = 1e-5, 2.0 ** -23, 1e-3
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "fake": "fake"}
CAAT_COLUMNS = {"avg_nat": "Avg. Nat.", "worst_nat": "Worst Nat.", "avg_bdy": "Avg. Bdy.", "worst_bdy": "Worst Bdy.",
                "avg_rob": "Avg. Rob.", "worst_rob": "Worst Rob."}


def fraction(s):
    """argparse type that accepts fractions: --caat-eps 8/255."""
    try:
        return float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {s!r}")


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument_group("what to evaluate").add_argument
    a("--ckpt", type=str, default="", help="model.pt / ckpt.pt of our scripts, or a plain state_dict")
    a("--dataset", type=str, default=None, choices=tuple(DATASETS), help="default: the checkpoint's, else cifar10")
    a("--data-dir", type=str, default="./data", help="where the dataset files are (or are downloaded to)")
    a("--download", action=argparse.BooleanOptionalAction, default=True, help="download missing dataset files")
    a("--n-examples", type=int, default=1000, help="evaluate the first N test images")
    a("--batch-size", type=int, default=256)
    a("--seed", type=int, default=0, help="re-seeded before every attack")
    a("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    a("--deterministic", action=argparse.BooleanOptionalAction, default=False, help="deterministic cuDNN / algorithms")
    a("--attack-bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast for the model's "
      "forward inside the attacks and AutoAttack (float32 logits; projections, budget checks and the accuracy counts "
      "stay fp32); default: on for CUDA, off for CPU")
    a("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model's forward "
      "(compiles again once for the last, smaller batch, and for AutoAttack's shrinking batches)")
    a = p.add_argument_group("model (images in [0, 1]; flags override our metadata, must fit the weights)").add_argument
    a("--arch", type=str, default=None, help="preact_resnet18 (ours, the default), or module:Class / path/to/file.py:"
      "Class: any nn.Module taking [0, 1] images, into which the checkpoint's state_dict is loaded")
    a("--arch-kwargs", type=json.loads, default={}, help="JSON object: the constructor arguments of --arch Class")
    a("--width", type=int, default=None, help="PreActResNet-18 width (default: metadata, else the weights')")
    a("--activation", type=str, default=None, choices=("relu", "softplus"),
      help="default: metadata, else relu (softplus: E-AT's weights)")
    a("--num-classes", type=int, default=None, help="default: metadata, else the weights'")
    a("--input-norm", type=str, default=None, choices=("dataset", "none"), help="mean/std inside our model "
      "(default: metadata, else the dataset's; none: raw [0, 1] input)")
    a = p.add_argument_group("attacks").add_argument
    a("--attacks", type=str, default="all", help="all, none, or a comma list of attacks.ATTACKS names")
    a("--level", type=str, default="medium", choices=("low", "medium", "high"), help="semantic attacks' LEVELS entry")
    a("--eps-table", type=str, default="", help="JSON {name: eps} (e.g. calibrated, Eq. 11); overrides")
    a("--steps", type=int, default=0, help="quick runs: N steps for every attack (same steps x step size) and "
      "AutoAttack's n_iter (0 = full strength)")
    a("--autoattack", type=str, default="", help="comma list of norms (linf,l2,l1) for AutoAttack")
    a("--aa-version", type=str, default="standard", choices=("standard", "apgd"), help="standard: APGD-CE, APGD-T, "
      "FAB-T, Square; apgd: APGD-CE + APGD-T (cheaper)")
    a("--aa-batch-size", type=int, default=250, help="images per AutoAttack call")
    a("--aa-queries", type=int, default=5000, help="Square attack queries (AutoAttack: 5000)")
    a("--caat-pgd", type=str, default="auto", help="steps of CAAT's PGD evaluations (comma list; empty = none; auto: "
      "10,20 when --attacks is all, else none)")
    a("--caat-eps", type=fraction, default=CAAT_EPS, help="eps of CAAT's PGD (Sec. 6.1)")
    a("--caat-step-size", type=fraction, default=CAAT_STEP, help="step size of CAAT's PGD")
    a = p.add_argument_group("tables and outputs").add_argument
    a("--scenario", type=str, default="auto", choices=("auto", "cifar", "svhn"), help="CAS Sec. 5.1 weights, groups")
    a("--lp-source", type=str, default="attack", choices=("attack", "autoattack"), help="l_p accuracies in the CAS "
      "aggregates: our PGD/APGD-l1, or AutoAttack where it ran (paper)")
    a("--out", type=str, default="", help="eval.json path (default: next to the checkpoint)")
    a("--resume", action="store_true", help="continue --out: skip the attacks already in it")
    a("--overwrite", action="store_true", help="replace an existing --out instead of refusing")
    a("--label", type=str, default="", help="method name in the tables (default: the checkpoint's folder)")
    a("--save-examples", type=str, default="", help="PNG: clean images and their adversarial versions")
    a("--n-show", type=int, default=8, help="images per row of --save-examples")
    a("--compare", type=str, nargs="+", default=None, help="eval.json files: print them side by side")
    a("--labels", type=str, default="", help="comma list of column names for --compare")
    a("--tradeoff", type=str, nargs="+", default=None, help="CAS Figs. 3/6: START.json ROW.json ...: each attack's "
      "accuracy change from the start model to each row's (fine-tuned on one attack)")
    a("--tradeoff-sequential", action="store_true", help="with --tradeoff: each row against the previous one")
    a("--aggregate", type=str, nargs="+", default=None, help="eval.json files of several seeds: mean +- std per "
      "--label (CAS Table 1 layout; time from the results.json beside each checkpoint)")
    return p


def get_args(argv=None):
    """Parse and validate: a user error is one argparse-style line (exit 2), no traceback."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if not (args.compare or args.aggregate or args.tradeoff):
        try:
            check_args(args, need_ckpt=True)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
    return args


def check_args(args, need_ckpt=False):
    if need_ckpt and not args.ckpt:
        raise ValueError("--ckpt is required (or --compare / --aggregate / --tradeoff with eval.json files)")
    if args.ckpt and not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")
    for flag, low in (("n_examples", 1), ("batch_size", 1), ("aa_batch_size", 1), ("aa_queries", 1), ("n_show", 1),
                      ("steps", 0)):
        if getattr(args, flag) < low:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)!r}")
    if any(s.strip() not in NORMS for s in args.autoattack.split(",") if s.strip()):
        raise ValueError(f"--autoattack: unknown norm in {args.autoattack!r}; choose from {', '.join(NORMS)}")
    if args.caat_pgd != "auto" and not all(s.strip().isdigit() and int(s) > 0 for s in args.caat_pgd.split(",")
                                           if s.strip()):
        raise ValueError(f"--caat-pgd must be a comma list of positive step counts, got {args.caat_pgd!r}")
    if not isinstance(args.arch_kwargs, dict):
        raise ValueError(f"--arch-kwargs must be a JSON object, got {args.arch_kwargs!r}")
    if args.arch not in (None, "preact_resnet18"):
        ours = [f for f in ("width", "activation", "num_classes", "input_norm") if getattr(args, f) is not None]
        if ":" not in args.arch or ours:
            raise ValueError(f"--arch {args.arch}: " + (f"--{ours[0].replace('_', '-')} is a flag of our "
                             "PreActResNet-18; give that class's arguments with --arch-kwargs" if ours else
                             "expected preact_resnet18, module:Class or path/to/file.py:Class"))
    attack_names(args.attacks)


def attack_names(spec):
    """--attacks: 'all' (the papers' order, then any other registered attack), 'none', or a validated list."""
    if spec.strip() == "all":
        return [n for n in attacks.ALL if n in ATTACKS] + [n for n in ATTACKS if n not in attacks.ALL]
    return [] if spec.strip() in ("", "none") else attacks.registered(spec)


def ordered(names):
    """Attack names in the papers' order (attacks.ALL, then the registry, then unknown names sorted)."""
    rank = {n: i for i, n in enumerate(attack_names("all"))}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def eval_kwargs(name, dataset, level, eps_table, steps=0):
    """Keyword arguments of attack `name` at full evaluation strength (attacks.attack_settings; --steps caps them)."""
    return attack_settings(name, "eval", dataset=dataset, eps=eps_table.get(name), steps=steps or None, level=level)


class SanityCheckError(RuntimeError):
    """An attack returned an invalid adversarial batch (NaN, outside [0, 1], or outside its budget)."""


def sanity_check(name, x, x_adv, norm=None, eps=None, model=None):
    """AutoAttack-style check of one adversarial batch: same shape, finite, in [0, 1], and for norm linf / l2 / l1 /
    lpips (ppgd's own distance) within eps (+ the tolerances above). Returns its stats (max_pert: that distance, or
    the l_inf change of attacks with latent constraints, norm None); raises SanityCheckError on failure."""
    if x_adv.shape != x.shape:
        raise SanityCheckError(f"{name}: x_adv has shape {tuple(x_adv.shape)}, x has {tuple(x.shape)}")
    n_bad = int((~torch.isfinite(x_adv)).sum())
    if n_bad:
        raise SanityCheckError(f"{name}: {n_bad} NaN/inf values in x_adv")
    lo, hi = float(x_adv.min()), float(x_adv.max())
    if lo < 0.0 or hi > 1.0:
        raise SanityCheckError(f"{name}: x_adv outside [0, 1] (min {lo:.6g}, max {hi:.6g})")
    delta = (x_adv - x).flatten(1)
    if norm in NORMS:
        pert, tol = delta.norm(p=P[norm], dim=1), float(eps) * BUDGET_RTOL + delta.shape[1] ** (1 / P[norm]) * ULP
    elif norm == "lpips":
        from attacks.perceptual import feature_fn, lpips_distance
        with torch.no_grad():
            pert, tol = lpips_distance(feature_fn(model, "self"), x, x_adv), float(eps) * LPIPS_RTOL
    else:
        pert, tol = delta.abs().amax(dim=1), math.inf
    max_pert = float(pert.max()) if len(pert) else 0.0
    if norm is not None and max_pert > float(eps) + tol:
        raise SanityCheckError(f"{name}: max {norm} perturbation {max_pert:.8g} exceeds eps {float(eps):.8g} "
                               f"(+ tolerance {tol:.2g})")
    return {"max_pert": max_pert, "x_min": lo, "x_max": hi, "n_nan": n_bad}


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


def classwise_json(y, correct_clean, correct_adv, num_classes):
    """classwise_errors as eval.json stores it: fractions, per-class lists (null for a class absent from the subset)."""
    e = classwise_errors(y, correct_clean, correct_adv, num_classes)
    per_class = lambda v: [None if math.isnan(a) else round(a, 6) for a in v.tolist()]   # noqa: E731
    return {**{k: v for k, v in e.items() if k not in ("nat", "rob")}, "classes": int((~e["nat"].isnan()).sum()),
            "nat_per_class": per_class(e["nat"]), "rob_per_class": per_class(e["rob"])}


def bits(correct):
    return "".join("01"[bool(c)] for c in correct.tolist())


def write_outputs(res, out, y, num_classes, scenario, lp_source):
    """Recompute the aggregates from the per-image `correct` strings (CAS Table 1 with the weights of Sec. 5.1, union,
    CAAT class-wise); write eval.json and eval.md atomically when `out` is set. Returns the markdown."""
    unbits = lambda s: torch.tensor([c == "1" for c in s], dtype=torch.bool)   # noqa: E731
    clean, names = unbits(res["clean_correct"]), ordered(res["attacks"])
    acc = {n: res["attacks"][n]["acc"] for n in names}
    if lp_source == "autoattack":   # the paper's l_p numbers are AutoAttack's (Sec. 5.1)
        acc.update({n: res["autoattack"][n]["acc"] for n in names if n in res["autoattack"]})
    weights = scenario_weights(names, scenario)
    agg = {**aggregate(acc, weights, names, scenario), **{k: v for k, v in aggregate(acc, weights, names, "cifar")
                                                         .items() if k != "avg_robust"}}   # avg_lp, avg_semantic
    union = clean.clone()
    for entry in [*res["attacks"].values(), *res["autoattack"].values()]:   # CAAT's PGD runs are not in the union
        union &= unbits(entry["correct"])
    for entry in [*res["pgd"].values(), *res["autoattack"].values()]:
        entry["classwise"] = classwise_json(y, clean, unbits(entry["correct"]), num_classes)
    res.update({k: None if math.isnan(v) else v for k, v in agg.items()})
    res.update(avg_all=res["avg_robust"], union_acc=union.float().mean().item(), weights=dict(zip(names, weights)),
               scenario=scenario, lp_source=lp_source, clean_classwise=classwise_json(y, clean, clean, num_classes))
    text = markdown([res], [res["label"]])
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, res)
        write_text(out.with_suffix(".md"), text)
    return text


# ---- tables: CAS Table 1, per attack, AutoAttack (CAAT Tables 3-4), CAAT Tables 1-2; --aggregate, --tradeoff ----

def fmt(v, pct=None):
    """Table cells: a fraction in % (pct = digits), 8/255 rather than 0.0313725, '–' for None / NaN."""
    v = None if isinstance(v, float) and math.isnan(v) else v
    if v is None or pct is not None:
        return "–" if v is None else f"{100 * v:.{pct}f}"
    if isinstance(v, float) and abs(v * 255 - round(v * 255)) < 1e-6 and len(f"{v:.6g}") > 6:
        return f"{round(v * 255)}/255"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def md_table(header, rows, title=None):
    """A markdown table; with a title: the lines ["", title, "", table]."""
    table = "\n".join("| " + " | ".join(map(str, r)) + " |" for r in [header, ["---"] * len(header)] + rows)
    return table if title is None else ["", title, "", table]


def job_title(group, key, e):
    if group == "pgd":   # "pgd10" -> PGD-10; a --steps run says how many steps it really took
        quick = "" if e["steps"] == int(key[3:]) else f", run with {e['steps']} steps"
        return f"PGD-{key[3:]} (l_inf {fmt(e['eps'])}{quick})"
    return f"AutoAttack-{key} ({e['version']}, eps {fmt(e['eps'])})" if group == "autoattack" else key


def markdown(evals, labels):
    """All tables for one evaluation or several (--compare): methods in columns (CAS), in rows (CAAT)."""
    first, scen, one = evals[0], evals[0].get("scenario", "cifar"), len(evals) == 1
    out = [f"- **{lab}**: `{e['ckpt']}`; {e['data_label']}; seed {e['seed']}; attacks {e['config']['level']} level"
           f"{', --steps ' + str(e['config']['steps']) if e['config']['steps'] else ''}"
           f"{'' if e.get('complete', True) else '; INCOMPLETE, pending: ' + ', '.join(e['pending'])}"
           for e, lab in zip(evals, labels)]
    keys = {"avg_robust": "avg. Robust", **({"avg_lp": "avg. ℓ_p", "avg_semantic": "avg. Semantic"} if scen == "cifar"
            else {"avg_corruption": "avg. Corruption", "avg_others": "avg. Others"}), "union_acc": "Union (worst case)"}
    rows = [[DATASET_NAMES.get(first["dataset"], first["dataset"]), "Clean"] + [fmt(e["clean_acc"], 2) for e in evals]]
    rows += [["", t] + [fmt(e.get(k), 2) for e in evals] for k, t in keys.items()]
    out += md_table(["Dataset", "Accuracy"] + labels, rows,
                    f"**Accuracy (%), CAS Table 1 layout** (scenario {scen}: weight 6 for "
                    f"{'l_inf, l_2, l_1' if scen == 'cifar' else 'snow, fog, blur'}, 1 for the others; l_p from "
                    f"{first.get('lp_source', 'attack')})")
    acc = lambda e, g, k: fmt(e[g][k]["acc"], 2) if k in e[g] else "–"   # noqa: E731
    names = ordered({n for e in evals for n in e["attacks"]})   # JSON keys are sorted: back to the papers' order
    if names and one:
        rows = [[n, fmt(first["weights"].get(n)), fmt(a["eps"]), a["steps"], fmt(a["acc"], 2),
                 f"{a['max_pert']:.4g} ({a['pert']})", f"{a['time_s']:.1f}"] for n, a in
                ((n, first["attacks"][n]) for n in names)]
        out += md_table(["attack", "weight", "eps", "steps", labels[0], "max pert (norm)", "time (s)"], rows,
                        "**Accuracy (%) per attack**")
    elif names:
        out += md_table(["attack"] + labels, [[n] + [acc(e, "attacks", n) for e in evals] for n in names],
                        "**Accuracy (%) per attack**")
    ref = lambda g, k: next(e[g][k] for e in evals if k in e[g])   # noqa: E731
    norms = [n for n in NORMS if any(n in e["autoattack"] for e in evals)]
    if norms:
        out += md_table(["Method"] + [job_title("autoattack", n, ref("autoattack", n)) for n in norms],
                        [[lab] + [acc(e, "autoattack", n) for n in norms] for e, lab in zip(evals, labels)],
                        "**Robust accuracy (%) for AutoAttack, CAAT Tables 3-4 layout**")
    rank = lambda k: (int(k[3:]), k) if k.startswith("pgd") else (NORMS.index(k) if k in NORMS else 9, k)  # noqa: E731
    jobs = list(dict.fromkeys((g, k) for e in evals for g in ("pgd", "autoattack") for k in sorted(e[g], key=rank)))
    cw = lambda e, g, k: [fmt(e[g][k]["classwise"][c], 1) if k in e[g] else "–" for c in CAAT_COLUMNS]  # noqa: E731
    title = "**Average and worst-class natural, boundary and robust errors (%), CAAT Tables 1-2 layout (Eqs. 45-48)**"
    if jobs and one:
        rows = [[job_title(g, k, first[g][k])] + cw(first, g, k) for g, k in jobs]
        out += md_table(["Attack", *CAAT_COLUMNS.values()], rows, title)
    elif jobs:
        out += ["", title] + [line for g, k in jobs for line in md_table(
            ["Method", *CAAT_COLUMNS.values()], [[lab] + cw(e, g, k) for e, lab in zip(evals, labels)],
            f"*{job_title(g, k, ref(g, k))}*")]
    return "\n".join(out) + "\n"


def read_eval(path, complete=False):
    """An eval.json written by eval.py (complete: no attack pending), else a ValueError naming the file."""
    e = json.loads(Path(path).read_text())
    if e.get("format") != FORMAT or "attacks" not in e:
        raise ValueError(f"{path}: not an eval.json written by eval.py (format {FORMAT})")
    if complete and e.get("pending"):
        raise ValueError(f"{path}: evaluation incomplete (pending {e['pending']}); finish it with --resume")
    return e


def compare(paths, labels):
    """--compare: the tables of several eval.json files, with a warning where they are not comparable."""
    evals = [read_eval(p) for p in paths]
    labels = [s.strip() for s in labels.split(",")] if labels else \
        [e.get("label") or Path(p).parent.name for e, p in zip(evals, paths)]
    if len(labels) != len(evals):
        raise ValueError(f"--labels has {len(labels)} names for {len(evals)} files")
    labels = labels if len(set(labels)) == len(labels) else [f"{lab} ({i + 1})" for i, lab in enumerate(labels)]
    differ = lambda f: len({json.dumps(f(e), sort_keys=True) for e in evals if f(e) is not None}) > 1  # noqa: E731
    notes = [f"the evaluations differ in dataset, number of images, seed, scenario or --lp-source (the tables use "
             f"the first one's {evals[0]['scenario']} scenario)"] if differ(
        lambda e: [e[k] for k in ("dataset", "n", "seed", "scenario", "lp_source")]) else []
    notes += ["the aggregates are over different sets of attacks"] if differ(lambda e: sorted(e["attacks"])) else []
    notes += [f"{g}/{k} was run with different settings" for g in GROUPS
              for k in sorted({k for e in evals for k in e[g]}) if differ(lambda e: e[g].get(k, {}).get("kwargs"))]
    return "".join(f"**Warning: {n}.**\n" for n in notes) + markdown(evals, labels)


def aggregate_seeds(paths):
    """--aggregate: mean +- sample std over the eval.json files of each label (CAS Table 1 layout), and Table 2's
    fine-tuning time (time/train_s of the results.json beside each checkpoint: training alone)."""
    groups = {}
    for p in paths:
        e = read_eval(p, complete=True)
        run = Path(e["ckpt"]).parent   # the training run's folder, when it is ours
        info = [json.loads((run / f).read_text()) if e["ckpt"] and (run / f).is_file() else {}
                for f in ("results.json", "args.json")]
        groups.setdefault(e["label"], []).append({**e, "wall_s": info[0].get("time/train_s"),
                                                  "train_seed": info[1].get("seed")})
    if len({(e["dataset"], e["n"], e["scenario"], *sorted(e["attacks"])) for g in groups.values() for e in g}) > 1:
        raise ValueError("--aggregate: the files differ in dataset, number of images, scenario or attacks")
    first = next(iter(groups.values()))[0]
    cols = {"clean": "Clean", "avg_robust": "avg. Robust", **({"avg_lp": "avg. l_p", "avg_semantic": "avg. Semantic"}
            if first["scenario"] == "cifar" else {"avg_corruption": "avg. Corruption", "avg_others": "avg. Others"})}
    mean_std = lambda v: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) if v else (None, None)  # noqa
    table, rows = {}, []
    for label, evals in groups.items():
        entry = table[label] = {"train_seeds": [e["train_seed"] for e in evals], "ckpts": [e["ckpt"] for e in evals]}
        for k in cols:
            vals = (e["clean_acc"] if k == "clean" else e.get(k) for e in evals)
            entry[k] = mean_std([v for v in vals if v is not None])
        entry["wall_min"] = mean_std([e["wall_s"] / 60 for e in evals if e["wall_s"] is not None])
        rows.append([label, len(evals)] + [f"{100 * m:.2f} ± {100 * s:.2f}" if m is not None else "–"
                                           for m, s in (entry[k] for k in cols)]
                    + [f"{m:.1f} ± {s:.1f}" if m is not None else "–" for m, s in [entry["wall_min"]]])
    return (f"Accuracy (%) on the {first['data_label']}, mean ± std (sample std) over the runs of each label; "
            f"fine-tuning time of the training run (min; training alone, no evaluation).\n\n"
            + md_table(["Method", "runs", *cols.values(), "fine-tuning time (min)"], rows)), table


def tradeoff_matrix(paths, sequential):
    """--tradeoff, CAS Figs. 3/6: entry (k, j) = acc_j after fine-tuning on attack k alone - acc_j before, and the
    sum. paths: the start model's eval.json, then one per row (named by its label); sequential: row k vs row k-1."""
    evals = [read_eval(p, complete=True) for p in paths]
    if len(evals) < 2:
        raise ValueError("--tradeoff needs the start model's eval.json and at least one row's")
    names = ordered(set.intersection(*(set(e["attacks"]) for e in evals)))
    rows, table = [["(start accuracy, %)"] + [f"{100 * evals[0]['attacks'][j]['acc']:.1f}" for j in names] + [""]], {}
    for i, e in enumerate(evals[1:]):
        ref = evals[i] if sequential else evals[0]
        d = table[e["label"]] = {j: e["attacks"][j]["acc"] - ref["attacks"][j]["acc"] for j in names}
        rows.append([e["label"]] + [f"{100 * v:+.1f}" for v in d.values()] + [f"{100 * sum(d.values()):+.1f}"])
    total = sum(sum(d.values()) for d in table.values())
    text = (f"Trade-off matrix (CAS Figs. 3/6): change of robust accuracy (points) on the {evals[0]['data_label']} "
            f"after fine-tuning on one attack (row){', each row against the previous' if sequential else ''}; "
            f"columns: the attack evaluated.\n\n" + md_table(["trained on \\ evaluated on"] + names + ["row sum"], rows)
            + f"\n\nSum of the matrix: {100 * total:+.1f} points over {len(table)} rows.")
    return text, {"attacks": names, "sequential": sequential, "rows": table, "sum": total}


# ---- the model: ours from its metadata or its weights, or any class (--arch module:Class) ----

def build_model_from_ckpt(path, device="cpu", width=None, activation=None, num_classes=None, mean=None, std=None,
                          arch=None, arch_kwargs=None):
    """A checkpoint's model in eval mode. arch "module:Class" / "path/to/file.py:Class": Class(**arch_kwargs), the
    state_dict loaded strictly. Else our PreActResNet-18 from our model.pt / ckpt.pt metadata, or from what a plain
    state_dict's weights determine (width: conv1's out channels; classes: the linear layer's rows). The arguments
    override the metadata (mean / std: default none, [0, 1] input) and must fit the weights, else a ValueError."""
    ckpt = load_checkpoint(path)
    if arch not in (None, "preact_resnet18"):
        mod, _, name = arch.rpartition(":")
        sys.path.insert(0, str(Path(mod).resolve().parent) if mod.endswith(".py") else os.getcwd())   # its imports
        if mod.endswith(".py"):
            src = importlib.util.spec_from_file_location(Path(mod).stem, mod)
            src.loader.exec_module(module := importlib.util.module_from_spec(src))
        else:
            module = importlib.import_module(mod)
        if not callable(getattr(module, name, None)):
            raise ValueError(f"--arch {arch}: {mod} defines no class {name!r}")
        model = getattr(module, name)(**(arch_kwargs or {}))
        try:
            model.load_state_dict(extract_state_dict(ckpt, path))
        except RuntimeError as e:
            raise ValueError(f"{path} does not fit --arch {arch}: {' '.join(str(e).split())[:400]}") from e
        return place_model(model, device).eval()
    meta = ckpt if isinstance(ckpt, dict) and "arch" in ckpt else {}
    if meta and meta["arch"] != "preact_resnet18":
        raise ValueError(f"{path}: unknown arch {meta['arch']!r}; give its class with --arch module:Class")
    sd, given = extract_state_dict(ckpt, path), {"width": width, "num_classes": num_classes}
    found = {k: sd[w].shape[0] for k, w in (("width", "conv1.weight"), ("num_classes", "linear.weight")) if w in sd}
    for k, v in given.items():
        if v is not None and k in found and v != found[k]:
            raise ValueError(f"--{k.replace('_', '-')} {v} does not fit the weights of {path}: they have "
                             f"{k.replace('_', ' ')} {found[k]}")
    inferred = [f"width {v}" if k == "width" else f"{v} classes" for k, v in found.items()
                if given[k] is None and k not in meta]
    if inferred:
        print(f"{path}: inferred from the weights: {', '.join(inferred)}", flush=True)
    model = build_model(num_classes or found.get("num_classes") or meta.get("num_classes", 10),
                        mean or meta.get("mean", (0.0, 0.0, 0.0)), std or meta.get("std", (1.0, 1.0, 1.0)),
                        width or found.get("width") or meta.get("width", 64),
                        activation or meta.get("activation", "relu"))
    try:
        load_weights(model, path)
    except ValueError as e:
        raise ValueError(f"{e}; another architecture: --arch module:Class") from e
    return place_model(model, device).eval()


# ---- evaluation: clean, then one job per attack (re-seeded, sanity-checked, written) ----

def make_jobs(args, dataset, eps_table):
    """[(group, key, fn(model, x, y) -> x_adv, settings, norm checked, batch size)] in the order they run."""
    def job(group, key, f, kw, norm, steps, bs=args.batch_size, **extra):   # --attack-bf16: the attack's forward
        return group, key, lambda m, x, y: f(attack_model(m, args.attack_bf16), x, y, **kw), {
            "kwargs": kw, "eps": kw["eps"], "steps": steps, **extra}, norm, bs

    jobs = []
    for name in attack_names(args.attacks):
        kw = eval_kwargs(name, dataset, args.level, eps_table, args.steps)
        norm = name if name in NORMS else "lpips" if name == "ppgd" and kw.get("lpips_net", "self") == "self" else None
        jobs.append(job("attacks", name, ATTACKS[name], kw, norm, kw.get("steps")))
    caat_pgd = ("10,20" if args.attacks.strip() == "all" else "") if args.caat_pgd == "auto" else args.caat_pgd
    for k in [int(s) for s in caat_pgd.split(",") if s.strip()]:
        kw = {"eps": args.caat_eps, "steps": args.steps or k, "step_size": args.caat_step_size * k / (args.steps or k)}
        jobs.append(job("pgd", f"pgd{k}", ATTACKS["linf"], kw, "linf", kw["steps"]))
    for norm in [s.strip() for s in args.autoattack.split(",") if s.strip()]:
        kw = {"norm": norm, "eps": DEFAULT_EPS.get(dataset, DEFAULT_EPS["cifar10"])[norm], "version": args.aa_version,
              "seed": args.seed, "n_queries": args.aa_queries, **({"n_iter": args.steps} if args.steps else {})}
        jobs.append(job("autoattack", norm, lambda m, x, y, **kw: attacks.autoattack(
            m, x, y, batch_size=args.aa_batch_size, log=lambda line: print(line, flush=True), **kw)[0], kw, norm,
            kw.get("n_iter", 100), version=args.aa_version))
    return jobs


def job_estimates(model, x_u8, y, clean_correct, jobs, num_classes, batch_size):
    """Seconds each job should take, from its structure: (input-gradient passes, forward passes) per image times the
    measured cost of one pass; an attack takes `steps` gradient passes on every image (semantic attacks and PPGD
    cost more per step: the ETA rescales by the measured times as jobs finish), AutoAttack attacks.autoattack's
    cost on the clean-correct points (as if no point broke)."""
    if not jobs:
        return []
    x = to_float(x_u8[:batch_size]).requires_grad_(True)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(2):   # the second run is timed (the first warms up)
        sync(), (t0 := time.perf_counter())
        with torch.no_grad():
            model(x)
        sync(), (t1 := time.perf_counter())
        torch.autograd.grad(F.cross_entropy(model(x), y[:batch_size]), x)
        sync(), (t2 := time.perf_counter())
    t_fwd, t_grad = (t1 - t0) / len(x), (t2 - t1) / len(x)
    est = []
    for group, _, _, settings, _, _ in jobs:
        if group == "autoattack":
            kw = settings["kwargs"]
            grad, fwd = aa_cost(kw["norm"], kw["version"], kw.get("n_iter", 100), kw["n_queries"], num_classes)
            est.append(int(clean_correct.sum()) * (grad * t_grad + fwd * t_fwd))
        else:
            est.append(len(y) * max(settings["steps"] or 1, 1) * t_grad)
    return est


def hms(seconds):
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else (f"{m}m{s:02d}s" if m else f"{s}s")


def run_job(model, x_u8, y, fn, name, norm, eps, batch_size, seed, n_show, whole=False):
    """One attack through the shared `evaluate` (re-seeded), every batch sanity-checked; returns the per-image
    correctness, the check's stats and the first n_show adversarial images. whole: fn gets every image at once
    (AutoAttack batches itself, each component over all images before the next), its output is checked per batch.
    Under torchrun each rank attacks its share of the batches (as `evaluate` deals them) and the results are merged.
    """
    stats, shown = {"max_pert": 0.0, "x_min": 1.0, "x_max": 0.0, "n_nan": 0}, []
    rank, size = world()
    if whole:   # this rank's batches at once, in evaluate's order (AutoAttack's chunks = the same batches)
        mine = torch.cat([torch.arange(len(y), device=y.device)[i: i + batch_size]
                          for i in range(rank * batch_size, len(y), size * batch_size)])
        done = iter(fn(model, to_float(x_u8[mine]), y[mine]).split(batch_size))
        fn = lambda m, x, y_b: next(done)   # noqa: E731  (evaluate visits the batches in order)

    def checked(m, x, y_b):
        x_adv = fn(m, x, y_b)
        s = sanity_check(name, x, x_adv, norm=norm, eps=eps, model=m)
        stats.update(max_pert=max(stats["max_pert"], s["max_pert"]), x_min=min(stats["x_min"], s["x_min"]),
                     x_max=max(stats["x_max"], s["x_max"]))
        shown.append(x_adv[:n_show - sum(map(len, shown))].detach().cpu())
        return x_adv

    correct = evaluate(model, x_u8, y, {name: checked}, batch_size, seed, (rank, size), all_gather)["correct"][name]
    if size > 1:   # the check's stats over every rank's batches (the images shown: rank 0's, from batch 0 on)
        every = all_gather(stats)
        stats = {"max_pert": max(s["max_pert"] for s in every), "x_min": min(s["x_min"] for s in every),
                 "x_max": max(s["x_max"] for s in every), "n_nan": sum(s["n_nan"] for s in every)}
    return correct.cpu(), stats, torch.cat(shown or [to_float(x_u8[:0])]).cpu()


class UsageError(ValueError):
    """A setting or input that does not fit, found before any attack ran; the CLI prints it in one line (exit 2)."""


def evaluate_model(model, dataset="cifar10", **options):
    """Evaluate `model` (any nn.Module taking images in [0, 1]; put in eval mode) on `dataset`. options: the flags'
    names (attacks="linf,fog", n_examples=500, out="eval.json", ...; else the flags' defaults). eval.json / eval.md
    are written only with `out` (or `ckpt`: next to it, as the CLI does). Returns the eval.json dict."""
    args = make_parser().parse_args([])
    if set(options) - set(vars(args)):
        raise TypeError(f"evaluate_model: unknown options {sorted(set(options) - set(vars(args)))} (flag names)")
    vars(args).update(options, dataset=dataset)
    try:   # everything that can be checked before the first attack: a user error, not a bug
        check_args(args)
        init_distributed(args.device)   # torchrun: the batches are shared out over the ranks (README, eval.py)
        seed_everything(args.seed, args.deterministic)
        model = place_model(model, device := pick_device(args.device)).eval()   # CUDA: channels_last
        net = torch.compile(model) if resolve_speed_flags(args, device).compile else model   # the forwards
        data = make_datasets(argparse.Namespace(dataset=dataset, data_dir=args.data_dir, download=args.download,
                                                train_subset=0, test_subset=0, input_norm="dataset"), "cpu")
        x_u8, y = (data[k][: args.n_examples].to(args.device) for k in ("test_x", "test_y"))
        with torch.no_grad():
            num_classes = model(to_float(x_u8[:1])).shape[1]
        if int(y.max()) >= num_classes:
            raise ValueError(f"the model has {num_classes} classes but {dataset} labels go up to {int(y.max())}")
        jobs = make_jobs(args, dataset, eps_table := load_eps_table(args.eps_table))
        if any(j[4] == "lpips" for j in jobs):   # ppgd's distance: model.features, else maps taken by forward hooks
            try:
                with torch.no_grad():
                    attacks.perceptual.feature_fn(model, "self")(to_float(x_u8[:1]))
            except ValueError as e:
                raise ValueError(f"{e} (in eval.py: leave ppgd out of --attacks)") from e
        ckpt = str(Path(args.ckpt).resolve()) if args.ckpt else ""
        out = Path(args.out) if args.out else Path(ckpt).parent / "eval.json" if ckpt else None
        info = {"num_classes": num_classes, **({
            "width": model.conv1.out_channels, "mean": model.normalize.mean.flatten().tolist(),
            "activation": "softplus" if isinstance(model.layer1[0].act, nn.Softplus) else "relu",
            "std": model.normalize.std.flatten().tolist()} if isinstance(model, PreActResNet18) else
            {"arch": args.arch or f"{type(model).__module__}:{type(model).__qualname__}"})}
        res = start_results(args, out, jobs, {
            "format": FORMAT, "ckpt": ckpt, "dataset": dataset, "n": len(y), "seed": args.seed, "model": info,
            "batch_size": args.batch_size, "label": args.label or (Path(ckpt).parent.name if ckpt else
                                                                   type(model).__name__),
            "data_label": f"first {len(y)} of the {len(data['test_y'])} {DATASET_NAMES.get(dataset, dataset)} test "
                          f"images{' under ' + args.data_dir if dataset != 'fake' else ''}",
            "config": {"attacks": args.attacks, "level": args.level, "steps": args.steps, "eps_table": eps_table,
                       "aa_version": args.aa_version, "caat_pgd": args.caat_pgd, "lp_source": args.lp_source,
                       "attack_bf16": args.attack_bf16, "compile": args.compile}})
        first = evaluate(net, x_u8, y, {}, args.batch_size, args.seed, world(), all_gather)
        clean = bits(first["correct"]["clean"])
        if res.setdefault("clean_correct", clean) != clean:
            raise ValueError(f"--resume: the clean predictions differ from those in {out} (another model or data?)")
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e
    res["clean_acc"] = first["clean"]
    print(f"output: {out}\n{res['data_label']}: clean accuracy {res['clean_acc']:.4f}", flush=True)
    if res["clean_acc"] < 0.3 and dataset != "fake":
        print("  low clean accuracy: if the model expects other inputs, " + ("try --input-norm dataset / none (ours "
              f"now: mean {info['mean']}, std {info['std']})" if "mean" in info else "it must take [0, 1] images "
              "and normalise them itself"), flush=True)
    scenario = args.scenario if args.scenario != "auto" else ("svhn" if dataset == "svhn" else "cifar")
    for group, key, *_ in jobs:
        if key in res[group]:
            print(f"skip {job_title(group, key, res[group][key])}: already in {out}", flush=True)
    todo, t_start, examples = [j for j in jobs if j[1] not in res[j[0]]], time.time(), []
    est = job_estimates(net, x_u8, y, first["correct"]["clean"], todo, num_classes, args.batch_size)
    for i, (group, key, fn, settings, norm, bs) in enumerate(todo):
        t0 = time.time()
        if group == "autoattack":
            print(f"AutoAttack-{key} ({settings['version']}) on {int(first['correct']['clean'].sum())} points: "
                  f"about {hms(est[i])} if no point breaks (then every point runs every component)", flush=True)
        correct, stats, shown = run_job(net, x_u8, y, fn, key, norm, settings["eps"], bs, args.seed, args.n_show,
                                        whole=group == "autoattack")
        e = res[group][key] = {**settings, **stats, "acc": correct.float().mean().item(), "correct": bits(correct),
                               "pert": norm or "linf (latent-bounded)", "time_s": time.time() - t0}
        res.update(pending=[f"{g}/{k}" for g, k, *_ in todo[i + 1:]], complete=i + 1 == len(todo))
        write_outputs(res, out, y, num_classes, scenario, args.lp_source)   # after EVERY attack: a crash keeps it
        examples.append((job_title(group, key, e), shown))
        scale = (time.time() - t_start) / sum(est[: i + 1])   # ETA: the estimates, rescaled by the measured times
        print(f"[{i + 1}/{len(todo)}] {examples[-1][0]:<36} acc {e['acc']:.4f} | max pert {e['max_pert']:.4g} "
              f"({e['pert']}) | {hms(e['time_s'])} | elapsed {hms(time.time() - t_start)} | ETA "
              f"{hms(scale * sum(est[i + 1:]))}", flush=True)
    res.update(pending=[], complete=True)
    text = write_outputs(res, out, y, num_classes, scenario, args.lp_source)
    print(f"\n{text}" + (f"\nwritten: {out}, {out.with_suffix('.md')}" if out else ""), flush=True)
    if args.save_examples and examples and world()[0] == 0:   # row 0 the clean images, then one row per attack
        from torchvision.utils import save_image   # only here: eval.py needs torchvision for this option alone
        save_image(torch.cat([to_float(x_u8[: args.n_show]).cpu()] + [r for _, r in examples]), args.save_examples,
                   nrow=min(args.n_show, len(y)), padding=2, pad_value=1.0)
        print(f"examples: {args.save_examples} (rows: clean, {', '.join(t for t, _ in examples)})", flush=True)
    return res


def start_results(args, out, jobs, res):
    """res with empty groups, or (--resume) the finished entries of `out` after checking they fit this run."""
    res.update({g: {} for g in GROUPS})
    if out is None or not out.exists():
        return res
    if not (args.resume or args.overwrite):
        raise FileExistsError(f"{out} exists; continue it with --resume, replace it with --overwrite, or choose "
                              f"another --out")
    if not args.resume:
        return res
    old = json.loads(out.read_text())
    for key in ("format", "ckpt", "dataset", "n", "seed", "batch_size"):
        if old.get(key) != res[key]:
            raise ValueError(f"--resume: {out} has {key} = {old.get(key)!r}, this run {res[key]!r}; use another --out")
    was, now = old.get("config", {}).get("attack_bf16"), res["config"]["attack_bf16"]
    if was != now:   # bf16 and fp32 attacks are not the same evaluation: one file holds one of them
        raise ValueError(f"--resume: {out} was run with attack_bf16 = {was!r}, this run {now!r}; pass "
                         f"--{'' if was else 'no-'}attack-bf16 or use another --out")
    for group, key, _, settings, _, _ in jobs:
        if key in old[group] and old[group][key]["kwargs"] != json.loads(json.dumps(settings["kwargs"])):
            raise ValueError(f"--resume: {group}/{key} in {out} was run with {old[group][key]['kwargs']}, this run "
                             f"asks for {settings['kwargs']}; use another --out")
    res.update({g: old[g] for g in GROUPS}, clean_correct=old["clean_correct"])
    print(f"resuming {out}: {sum(len(old[g]) for g in GROUPS)} entries done", flush=True)
    return res


def main(args):
    """The CLI: render tables (--compare, --aggregate, --tradeoff), or build --ckpt's model and evaluate it."""
    try:   # user errors (a foreign file, weights that do not fit a flag, ...): one line, exit 2
        if args.compare:
            print(text := compare(args.compare, args.labels))
            return text
        if args.aggregate or args.tradeoff:
            text, table = aggregate_seeds(args.aggregate) if args.aggregate else \
                tradeoff_matrix(args.tradeoff, args.tradeoff_sequential)
            print(text)
            if args.out:
                write_text(Path(args.out).with_suffix(".md"), text + "\n")
                write_json(Path(args.out).with_suffix(".json"), table)
            return table
        ckpt = load_checkpoint(args.ckpt)
        meta = ckpt if isinstance(ckpt, dict) and "arch" in ckpt else {}
        dataset = args.dataset or meta.get("dataset", "cifar10")
        ds = DATASETS[dataset]   # our model's normalisation: the flag, else the metadata, else the dataset's
        mean, std = {"dataset": (ds["mean"], ds["std"]), "none": ((0.0,) * 3, (1.0,) * 3),
                     None: (None, None) if meta else (ds["mean"], ds["std"])}[args.input_norm]
        model = build_model_from_ckpt(args.ckpt, "cpu", args.width, args.activation, args.num_classes, mean, std,
                                      arch=args.arch, arch_kwargs=args.arch_kwargs)
    except (ValueError, OSError, ImportError) as e:
        make_parser().error(str(e))
    try:   # an error raised by an attack is not caught here: a bug, to be seen in full
        res = evaluate_model(model, **{**vars(args), "dataset": dataset})
    except UsageError as e:
        make_parser().error(str(e))
    end_distributed()
    return res


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
