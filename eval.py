"""eval.py -- robustness evaluation of any checkpoint: every registered attack, AutoAttack and the papers' tables.

    python eval.py --ckpt runs/cas/cifar10-s0-.../model.pt                         # all attacks, "medium" level
    python eval.py --ckpt model.pt --attacks linf,l2,l1,fog --autoattack linf,l2,l1 --n-examples 1000
    python eval.py --ckpt eat.pt --width 64 --activation softplus --input-norm none # a plain foreign state_dict
    python eval.py --compare runs/a/eval.json runs/b/eval.json --labels SAT,CAS     # methods side by side
    python eval.py --aggregate runs/t1/*/s*/eval.json --out runs/t1/table1.md       # mean +- std over seeds
    python eval.py --tradeoff start.json rows/*/eval.json --out matrix.md           # CAS Figs. 3/6

Rebuilds the PreActResNet-18 from the checkpoint's metadata (model.pt / ckpt.pt of cas.py, caat_meta.py,
caat_reinforce.py: arch, width, activation, num_classes, dataset, mean, std) or, for a plain state_dict (a
`module.` prefix is stripped), from --width/--activation/--num-classes/--input-norm. Evaluates the FIRST
--n-examples test images (unshuffled), in eval mode, and reports
  - clean accuracy and the accuracy under each attack of --attacks at full evaluation strength
    (attacks.attack_settings: l_p and ppgd from attacks.EVAL_STRENGTH, the semantic attacks from their module's
    LEVELS[--level]; eps from --eps-table where given);
  - the CAS paper's aggregates (Table 1, Sec. 5.1) with its scenario weights: weighted avg. Robust, avg. l_p and
    avg. Semantic (cifar) or avg. Corruption and avg. Others (svhn);
  - union accuracy: correct on the clean image AND under every attack and AutoAttack run (the worst case);
  - AutoAttack robust accuracy per norm of --autoattack (standard version, or --aa-version apgd);
  - the CAAT paper's class-wise errors (Eqs. 45-48, Tables 1-2): average and worst-class natural, boundary and
    robust error under PGD-10 / PGD-20 (eps 8/255, step 2/255) and under each AutoAttack run.
The global RNG is re-seeded with --seed before every attack (shared `evaluate`), so an attack's result depends
neither on the order nor on the set of attacks. Every adversarial batch passes an AutoAttack-style sanity check
(`sanity_check`: finite, inside [0, 1], l_p / LPIPS norm within the budget); a failure raises SanityCheckError.

Outputs: eval.json (default: next to the checkpoint; rewritten atomically after EVERY attack, so an interrupted run
keeps what it finished and --resume skips it) and eval.md (the markdown tables, also printed), one progress line per
attack (elapsed time, ETA), and with --save-examples a PNG grid: row 0 clean, then one row per attack run.
The schema of eval.json is in README.md#evalpy.
"""

import argparse
import json
import math
import os
import random
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
from attacks import ATTACKS, DEFAULT_EPS, attack_settings, load_eps_table

SCRIPT = "eval"
FORMAT = 1
NORMS = ("linf", "l2", "l1")
P = {"linf": float("inf"), "l2": 2.0, "l1": 1.0}

CAAT_EPS, CAAT_STEP = 8 / 255, 2 / 255   # CAAT Sec. 6.1 (FRL's setting): PGD eps 8/255, step 2/255, 10 / 20 steps

# Sanity-check tolerances. Range: exact ([0, 1], as AutoAttack's check). l_p budget: relative 1e-5 (float32
# arithmetic of the projections, as attacks/autoattack.py's re-check) plus the p-norm of a one-ulp-at-1.0 error per
# pixel, d^(1/p) * 2^-23 (recomputing x_adv - x in float32 rounds every pixel by at most one ulp of [0, 1] values).
# LPIPS (ppgd): relative 1e-3 (the distance is recomputed from features; batched kernels may differ in the last bits).
BUDGET_RTOL, ULP = 1e-5, 2.0 ** -23
LPIPS_RTOL = 1e-3


def fraction(s: str) -> float:
    """argparse type that accepts fractions: --caat-eps 8/255."""
    try:
        return float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {s!r}")


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("what to evaluate")
    g.add_argument("--ckpt", type=str, default="", help="model.pt / ckpt.pt of our scripts, or a plain state_dict")
    g.add_argument("--dataset", type=str, default=None, choices=("cifar10", "cifar100", "svhn", "fake"),
                   help="test set (default: the checkpoint's dataset, else cifar10)")
    g.add_argument("--data-dir", type=str, default="./data", help="where the dataset files are (or are downloaded to)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download missing dataset files (md5-checked archives)")
    g.add_argument("--n-examples", type=int, default=1000, help="evaluate the first N test images")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--seed", type=int, default=0, help="re-seeded before every attack")
    g.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="deterministic cuDNN / algorithms (CPU runs are deterministic anyway)")
    g = parser.add_argument_group("model (plain state_dicts; for our checkpoints these override the metadata)")
    g.add_argument("--arch", type=str, default=None, choices=("preact_resnet18",), help="architecture")
    g.add_argument("--width", type=int, default=None, help="base width (default: metadata, else 64)")
    g.add_argument("--activation", type=str, default=None, choices=("relu", "softplus"),
                   help="block activation (default: metadata, else relu; softplus: E-AT's weights)")
    g.add_argument("--num-classes", type=int, default=None, help="default: metadata, else the dataset's")
    g.add_argument("--input-norm", type=str, default=None, choices=("dataset", "none"),
                   help="mean/std inside the model (default: metadata, else the dataset's; none: raw [0,1] input)")
    g = parser.add_argument_group("attacks")
    g.add_argument("--attacks", type=str, default="all", help="all, none, or a comma list of attacks.ATTACKS names")
    g.add_argument("--level", type=str, default="medium", choices=("low", "medium", "high"),
                   help="strength of the attacks whose module has a LEVELS table (the semantic ones)")
    g.add_argument("--eps-table", type=str, default="", help="JSON {name: eps} (e.g. calibrated, Eq. 11); overrides")
    g.add_argument("--steps", type=int, default=0,
                   help="quick runs: N steps for every attack (step size rescaled to keep steps x step size) and "
                        "AutoAttack's n_iter (0 = full strength)")
    g.add_argument("--autoattack", type=str, default="", help="comma list of norms (linf,l2,l1) for AutoAttack")
    g.add_argument("--aa-version", type=str, default="standard", choices=("standard", "apgd"),
                   help="standard: APGD-CE, APGD-T, FAB-T, Square; apgd: APGD-CE + APGD-T (cheaper)")
    g.add_argument("--aa-batch-size", type=int, default=250, help="images per AutoAttack call")
    g.add_argument("--aa-queries", type=int, default=5000, help="Square attack queries (AutoAttack: 5000)")
    g.add_argument("--caat-pgd", type=str, default="10,20",
                   help="steps of CAAT's PGD evaluations (comma list; empty = none), eps --caat-eps")
    g.add_argument("--caat-eps", type=fraction, default=CAAT_EPS, help="eps of CAAT's PGD (Sec. 6.1)")
    g.add_argument("--caat-step-size", type=fraction, default=CAAT_STEP, help="step size of CAAT's PGD")
    g = parser.add_argument_group("tables and outputs")
    g.add_argument("--scenario", type=str, default="auto", choices=("auto", "cifar", "svhn"),
                   help="CAS weights and groups of Sec. 5.1 (auto: svhn for SVHN, else cifar)")
    g.add_argument("--lp-source", type=str, default="attack", choices=("attack", "autoattack"),
                   help="l_p accuracies in the CAS aggregates: our PGD/APGD-l1, or AutoAttack where it ran (paper)")
    g.add_argument("--out", type=str, default="", help="eval.json path (default: next to the checkpoint)")
    g.add_argument("--resume", action="store_true", help="continue --out: skip the attacks already in it")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out instead of refusing")
    g.add_argument("--label", type=str, default="", help="method name in the tables (default: checkpoint's folder)")
    g.add_argument("--save-examples", type=str, default="", help="PNG: clean images and their adversarial versions")
    g.add_argument("--n-show", type=int, default=8, help="images per row of --save-examples")
    g.add_argument("--compare", type=str, nargs="+", default=None, help="eval.json files: print them side by side")
    g.add_argument("--labels", type=str, default="", help="comma list of column names for --compare")
    g.add_argument("--tradeoff", type=str, nargs="+", default=None,
                   help="CAS Figs. 3/6: START.json ROW.json ...: the change of every attack's accuracy from the start "
                        "model's eval.json to each row's (a model fine-tuned on one attack alone); --out writes it")
    g.add_argument("--tradeoff-sequential", action="store_true",
                   help="with --tradeoff: measure each row against the previous row (a chain of fine-tunings)")
    g.add_argument("--aggregate", type=str, nargs="+", default=None,
                   help="eval.json files of several seeds: mean +- std per --label (the paper's Table 1 layout; "
                        "wall-clock from the results.json beside each checkpoint); --out writes the markdown")
    return parser


def get_args(argv=None):
    """Parse and validate: a user error is one argparse-style line (exit 2), no traceback."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if not (args.compare or args.aggregate or args.tradeoff):
        try:
            check_args(args)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
    return args


# ----------------------------------------------------------------------------------------------------------------
# Attack settings, the sanity check and the CAAT class-wise metrics
# ----------------------------------------------------------------------------------------------------------------

def attack_names(spec):
    """--attacks: 'all' (the papers' order, then any other registered attack), 'none', or a validated list."""
    if spec.strip() == "all":
        return [n for n in attacks.ALL if n in ATTACKS] + [n for n in ATTACKS if n not in attacks.ALL]
    if spec.strip() in ("", "none"):
        return []
    return attacks.registered(spec)


def ordered(names):
    """Attack names in the papers' order (attacks.ALL, then the registry, then unknown names sorted)."""
    rank = {n: i for i, n in enumerate(attack_names("all"))}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def eval_kwargs(name, dataset, level, eps_table, steps=0):
    """Keyword arguments of attack `name` at full evaluation strength (attacks.attack_settings; --steps caps them)."""
    return attack_settings(name, "eval", dataset=dataset, eps=eps_table.get(name), steps=steps or None, level=level)


class SanityCheckError(RuntimeError):
    """An attack returned an invalid adversarial batch (NaN, outside [0, 1], or outside its budget)."""


def perturbation_norm(name, kw):
    """Which distance the budget bounds: 'linf' / 'l2' / 'l1' / 'lpips', or None (latent constraints)."""
    if name in NORMS:
        return name
    if name == "ppgd" and kw.get("lpips_net", "self") == "self":
        return "lpips"
    return None


def sanity_check(name, x, x_adv, norm=None, eps=None, model=None):
    """AutoAttack-style check of one adversarial batch; returns its stats, raises SanityCheckError on failure.

    Always: same shape, no NaN/inf, values in [0, 1] (exact). norm 'linf'/'l2'/'l1': max_i ||x_adv_i - x_i||_p <=
    eps (tolerance: BUDGET_RTOL, ULP above). norm 'lpips': ppgd's own distance with the model's features <= eps.
    max_pert is that norm, or the l_inf change for attacks with latent constraints (informative only).
    """
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
        pert = delta.norm(p=P[norm], dim=1)
        tol = float(eps) * BUDGET_RTOL + delta.shape[1] ** (1 / P[norm]) * ULP
    elif norm == "lpips":
        from attacks.perceptual import feature_fn, lpips_distance
        with torch.no_grad():
            pert = lpips_distance(feature_fn(model, "self"), x, x_adv)
        tol = float(eps) * LPIPS_RTOL
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
    return "".join("1" if c else "0" for c in correct.tolist())


def unbits(s):
    return torch.tensor([c == "1" for c in s], dtype=torch.bool)


def summarize(res, y, num_classes, scenario, lp_source):
    """The aggregates of the finished entries: CAS Table 1 (shared `aggregate`), union, CAAT class-wise metrics."""
    clean = unbits(res["clean_correct"])
    names = ordered(res["attacks"])
    acc = {n: res["attacks"][n]["acc"] for n in names}
    if lp_source == "autoattack":   # the paper's l_p numbers are AutoAttack's (Sec. 5.1)
        acc.update({n: res["autoattack"][n]["acc"] for n in names if n in res["autoattack"]})
    weights = scenario_weights(names, scenario)
    agg = aggregate(acc, weights, names, scenario)                 # CAS Table 1 and Sec. 5.1 (weights 6 / 1)
    by_family = aggregate(acc, weights, names, "cifar")            # avg_lp / avg_semantic in every scenario
    union = clean.clone()
    for group in ("attacks", "autoattack"):
        for entry in res[group].values():
            union &= unbits(entry["correct"])
    for group in ("pgd", "autoattack"):
        for entry in res[group].values():
            entry["classwise"] = classwise_json(y, clean, unbits(entry["correct"]), num_classes)
    nan_to_none = lambda v: None if isinstance(v, float) and math.isnan(v) else v
    res.update({k: nan_to_none(v) for k, v in agg.items()})
    res.update(avg_lp=nan_to_none(by_family["avg_lp"]), avg_semantic=nan_to_none(by_family["avg_semantic"]),
               avg_all=nan_to_none(agg["avg_robust"]), union_acc=union.float().mean().item(),
               weights=dict(zip(names, weights)), scenario=scenario, lp_source=lp_source)
    res["clean_classwise"] = classwise_json(y, clean, clean, num_classes)


# ----------------------------------------------------------------------------------------------------------------
# Markdown: CAS Table 1 (methods in columns), per-attack accuracy, AutoAttack (CAAT Tables 3-4), CAAT Tables 1-2
# ----------------------------------------------------------------------------------------------------------------

DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "fake": "fake"}
CAAT_COLUMNS = (("avg_nat", "Avg. Nat."), ("worst_nat", "Worst Nat."), ("avg_bdy", "Avg. Bdy."),
                ("worst_bdy", "Worst Bdy."), ("avg_rob", "Avg. Rob."), ("worst_rob", "Worst Rob."))


def pct(v, digits=2):
    return "–" if v is None else f"{100 * v:.{digits}f}"


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def job_title(group, key, entry):
    if group == "pgd":   # key "pgd10" -> PGD-10; a --steps run says how many steps it really took
        nominal = int(key[3:])
        quick = "" if entry["steps"] == nominal else f", run with {entry['steps']} steps"
        return f"PGD-{nominal} (l_inf {fmt(entry['eps'])}{quick})"
    if group == "autoattack":
        return f"AutoAttack-{key} ({entry['version']}, eps {fmt(entry['eps'])})"
    return key


def job_rank(key):
    """pgd10 < pgd20 < ... ; linf < l2 < l1."""
    return (int(key[3:]), key) if key.startswith("pgd") else (NORMS.index(key) if key in NORMS else 9, key)


def fmt(v):
    if isinstance(v, float) and abs(v * 255 - round(v * 255)) < 1e-6 and len(f"{v:.6g}") > 6:
        return f"{round(v * 255)}/255"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def markdown(evals, labels):
    """All tables for one evaluation or several (--compare): methods in columns (CAS), in rows (CAAT)."""
    first = evals[0]
    scen = first.get("scenario", "cifar")
    groups = (("avg_lp", "avg. ℓ_p"), ("avg_semantic", "avg. Semantic")) if scen == "cifar" else \
        (("avg_corruption", "avg. Corruption"), ("avg_others", "avg. Others"))
    out = []
    for e, lab in zip(evals, labels):
        out.append(f"- **{lab}**: `{e['ckpt']}`; {e['data_label']}; seed {e['seed']}; attacks {e['config']['level']} "
                   f"level{', --steps ' + str(e['config']['steps']) if e['config']['steps'] else ''}"
                   f"{'' if e.get('complete', True) else '; INCOMPLETE, pending: ' + ', '.join(e['pending'])}")
    dataset = DATASET_NAMES.get(first["dataset"], first["dataset"])
    rows = [[dataset, "Clean"] + [pct(e["clean_acc"]) for e in evals],
            ["", "avg. Robust"] + [pct(e.get("avg_robust")) for e in evals]]
    rows += [["", title] + [pct(e.get(key)) for e in evals] for key, title in groups]
    rows.append(["", "Union (worst case)"] + [pct(e.get("union_acc")) for e in evals])
    out += ["", f"**Accuracy (%), CAS Table 1 layout** (scenario {scen}: weight 6 for "
            f"{'l_inf, l_2, l_1' if scen == 'cifar' else 'snow, fog, blur'}, 1 for the others; l_p from "
            f"{first.get('lp_source', 'attack')})", "", md_table(["Dataset", "Accuracy"] + labels, rows)]
    names = ordered({n for e in evals for n in e["attacks"]})   # JSON keys are sorted: back to the papers' order
    if names:
        if len(evals) == 1:
            weights, entries = first["weights"], first["attacks"]
            rows = [[n, f"{weights[n]:g}" if n in weights else "–", fmt(a["eps"]), a["steps"], pct(a["acc"]),
                     f"{a['max_pert']:.4g} ({a['pert']})", f"{a['time_s']:.1f}"]
                    for n, a in ((n, entries[n]) for n in names)]
            out += ["", "**Accuracy (%) per attack**", "",
                    md_table(["attack", "weight", "eps", "steps", labels[0], "max pert (norm)", "time (s)"], rows)]
        else:
            rows = [[n] + [pct(e["attacks"][n]["acc"]) if n in e["attacks"] else "–" for e in evals] for n in names]
            out += ["", "**Accuracy (%) per attack**", "", md_table(["attack"] + labels, rows)]
    norms = [n for n in NORMS if any(n in e["autoattack"] for e in evals)]   # linf, l2, l1
    if norms:
        rows = [[lab] + [pct(e["autoattack"][n]["acc"]) if n in e["autoattack"] else "–" for n in norms]
                for e, lab in zip(evals, labels)]
        out += ["", "**Robust accuracy (%) for AutoAttack, CAAT Tables 3-4 layout**", "",
                md_table(["Method"] + [job_title("autoattack", n, next(e["autoattack"][n] for e in evals
                                                                        if n in e["autoattack"])) for n in norms],
                         rows)]
    jobs = []
    for e in evals:
        jobs += [(g, k) for g in ("pgd", "autoattack") for k in sorted(e[g], key=job_rank) if (g, k) not in jobs]
    if jobs:
        head = [c for _, c in CAAT_COLUMNS]
        out += ["", "**Average and worst-class natural, boundary and robust errors (%), CAAT Tables 1-2 layout "
                "(Eqs. 45-48)**"]
        if len(evals) == 1:
            rows = [[job_title(g, k, first[g][k])] + [pct(first[g][k]["classwise"][c], 1) for c, _ in CAAT_COLUMNS]
                    for g, k in jobs]
            out += ["", md_table(["Attack"] + head, rows)]
        else:
            for g, k in jobs:
                ref = next(e[g][k] for e in evals if k in e[g])
                rows = [[lab] + ([pct(e[g][k]["classwise"][c], 1) for c, _ in CAAT_COLUMNS] if k in e[g]
                                 else ["–"] * len(head)) for e, lab in zip(evals, labels)]
                out += ["", f"*{job_title(g, k, ref)}*", "", md_table(["Method"] + head, rows)]
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
    evals = [read_eval(p) for p in paths]
    labels = [s.strip() for s in labels.split(",")] if labels else [e.get("label") or Path(p).parent.name
                                                                    for e, p in zip(evals, paths)]
    if len(labels) != len(evals):
        raise ValueError(f"--labels has {len(labels)} names for {len(evals)} files")
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({i + 1})" for i, lab in enumerate(labels)]
    notes = []
    if len({(e["dataset"], e["n"], e["seed"], e["scenario"], e["lp_source"]) for e in evals}) > 1:
        notes.append("the evaluations differ in dataset, number of images, seed, scenario or --lp-source "
                     f"(the tables use the first one's {evals[0]['scenario']} scenario)")
    if len({tuple(sorted(e["attacks"])) for e in evals}) > 1:
        notes.append("the aggregates are over different sets of attacks")
    for group in ("attacks", "pgd", "autoattack"):
        for key in sorted({k for e in evals for k in e[group]}):
            if len({json.dumps(e[group][key]["kwargs"], sort_keys=True) for e in evals if key in e[group]}) > 1:
                notes.append(f"{group}/{key} was run with different settings")
    warning = "".join(f"**Warning: {n}.**\n" for n in notes)
    return warning + markdown(evals, labels)


def aggregate_seeds(paths):
    """Mean +- std (sample std, ddof 1) over the eval.json files of each label, in the layout of CAS Table 1."""
    groups = {}
    for p in paths:
        e = read_eval(p, complete=True)
        run_dir = Path(e["ckpt"]).parent   # wall-clock and seed of the training run, when it is ours
        wall = json.loads((run_dir / "results.json").read_text()).get("time/train_s") \
            if (run_dir / "results.json").exists() else None   # Table 2: fine-tuning time, no evaluation
        seed = json.loads((run_dir / "args.json").read_text()).get("seed") if (run_dir / "args.json").exists() else None
        groups.setdefault(e["label"], []).append({**e, "wall_s": wall, "train_seed": seed})
    if len({(e["dataset"], e["n"], e["scenario"], tuple(sorted(e["attacks"]))) for g in groups.values() for e in g}) > 1:
        raise ValueError("--aggregate: the files differ in dataset, number of images, scenario or attacks")
    first = next(iter(groups.values()))[0]
    cols = [("clean", "Clean")] + ([("avg_robust", "avg. Robust"), ("avg_lp", "avg. l_p"), ("avg_semantic",
            "avg. Semantic")] if first["scenario"] == "cifar" else [("avg_robust", "avg. Robust"),
           ("avg_corruption", "avg. Corruption"), ("avg_others", "avg. Others")])

    def mean_std(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None, None
        m = sum(vals) / len(vals)
        return m, (math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)

    table, rows = {}, []
    for label, evals in groups.items():
        entry = {"train_seeds": [e["train_seed"] for e in evals], "ckpts": [e["ckpt"] for e in evals]}
        for key, _ in cols:
            entry[key] = mean_std([e["clean_acc"] if key == "clean" else e.get(key) for e in evals])
        entry["wall_min"] = mean_std([e["wall_s"] / 60 if e["wall_s"] is not None else None for e in evals])
        table[label] = entry
        cells = [f"{100 * m:.2f} ± {100 * sd:.2f}" if m is not None else "–" for m, sd in (entry[k] for k, _ in cols)]
        wm, ws = entry["wall_min"]
        rows.append([label, str(len(evals))] + cells + [f"{wm:.1f} ± {ws:.1f}" if wm is not None else "–"])
    text = (f"Accuracy (%) on the {first['data_label']}, mean ± std (sample std) over the runs of each label; "
            f"fine-tuning time of the training run (min; training alone, no evaluation).\n\n"
            + md_table(["Method", "runs"] + [c for _, c in cols] + ["fine-tuning time (min)"], rows))
    return text, table


def tradeoff_matrix(paths, sequential):
    """CAS Figs. 3/6: entry (k, j) = acc_j after fine-tuning on attack k alone - acc_j before, and the matrix's sum.

    paths: the start model's eval.json, then one eval.json per row (its label names the row: by default the folder
    of the checkpoint, i.e. the attack trained on). sequential: row k is measured against row k-1 (a chain).
    """
    evals = [read_eval(p, complete=True) for p in paths]
    if len(evals) < 2:
        raise ValueError("--tradeoff needs the start model's eval.json and at least one row's")
    names = ordered(set.intersection(*(set(e["attacks"]) for e in evals)))
    rows, table = [["(start accuracy, %)"] + [f"{100 * evals[0]['attacks'][j]['acc']:.1f}" for j in names] + [""]], {}
    for i, e in enumerate(evals[1:]):
        ref = evals[i] if sequential else evals[0]
        d = {j: e["attacks"][j]["acc"] - ref["attacks"][j]["acc"] for j in names}
        table[e["label"]] = d
        rows.append([e["label"]] + [f"{100 * v:+.1f}" for v in d.values()] + [f"{100 * sum(d.values()):+.1f}"])
    total = sum(sum(d.values()) for d in table.values())
    text = (f"Trade-off matrix (CAS Figs. 3/6): change of robust accuracy (points) on the {evals[0]['data_label']} "
            f"after fine-tuning on one attack (row){', each row against the previous' if sequential else ''}; "
            f"columns: the attack evaluated.\n\n" + md_table(["trained on \\ evaluated on"] + names + ["row sum"], rows)
            + f"\n\nSum of the matrix: {100 * total:+.1f} points over {len(table)} rows.")
    return text, {"attacks": names, "sequential": sequential, "rows": table, "sum": total}


def save_examples(path, clean, rows, n_show):
    """PNG grid: row 0 the clean images, then one row per attack (adversarial versions of the same images)."""
    from torchvision.utils import save_image   # only here: eval.py needs torchvision for this option alone
    grid = torch.cat([clean[:n_show].cpu()] + [r[:n_show].cpu() for _, r in rows])
    save_image(grid, path, nrow=min(n_show, len(clean)), padding=2, pad_value=1.0)
    print(f"examples: {path} (rows: clean, {', '.join(t for t, _ in rows)})", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# main: model -> data -> clean -> one job per attack (re-seeded, checked, written) -> tables
# ----------------------------------------------------------------------------------------------------------------

def make_jobs(args, dataset, eps_table):
    """[(group, key, fn(model, x, y) -> x_adv, settings, norm, batch size)] in the order they run."""
    jobs = []
    for name in attack_names(args.attacks):
        kw = eval_kwargs(name, dataset, args.level, eps_table, args.steps)
        fn = (lambda f, kw: lambda m, x, y: f(m, x, y, **kw))(ATTACKS[name], kw)
        jobs.append(("attacks", name, fn, {"kwargs": kw, "eps": kw["eps"], "steps": kw.get("steps")},
                     perturbation_norm(name, kw), args.batch_size))
    for k in [int(s) for s in args.caat_pgd.split(",") if s.strip()]:
        kw = {"eps": args.caat_eps, "steps": args.steps or k, "step_size": args.caat_step_size * k / (args.steps or k)}
        fn = (lambda kw: lambda m, x, y: ATTACKS["linf"](m, x, y, **kw))(kw)
        jobs.append(("pgd", f"pgd{k}", fn, {"kwargs": kw, "eps": kw["eps"], "steps": kw["steps"]}, "linf",
                     args.batch_size))
    for norm in [s.strip() for s in args.autoattack.split(",") if s.strip()]:
        eps = DEFAULT_EPS.get(dataset, DEFAULT_EPS["cifar10"])[norm]
        kw = {"norm": norm, "eps": eps, "version": args.aa_version, "seed": args.seed,
              "n_queries": args.aa_queries, **({"n_iter": args.steps} if args.steps else {})}
        fn = (lambda kw: lambda m, x, y: attacks.autoattack(m, x, y, **kw)[0])(kw)
        jobs.append(("autoattack", norm, fn, {"kwargs": kw, "eps": eps, "steps": kw.get("n_iter", 100),
                                               "version": args.aa_version}, norm, args.aa_batch_size))
    return jobs


def hms(seconds):
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else (f"{m}m{s:02d}s" if m else f"{s}s")


def run_job(model, x_u8, y, fn, name, norm, eps, batch_size, seed, n_show):
    """One attack through the shared `evaluate` (re-seeded), every batch sanity-checked; returns correctness, stats."""
    stats = {"max_pert": 0.0, "x_min": 1.0, "x_max": 0.0, "n_nan": 0}
    shown = []

    def checked(m, x, y_b):
        x_adv = fn(m, x, y_b)
        s = sanity_check(name, x, x_adv, norm=norm, eps=eps, model=m)
        stats.update(max_pert=max(stats["max_pert"], s["max_pert"]), x_min=min(stats["x_min"], s["x_min"]),
                     x_max=max(stats["x_max"], s["x_max"]))
        if sum(len(t) for t in shown) < n_show:
            shown.append(x_adv[:n_show].detach().cpu())
        return x_adv

    res = evaluate(model, x_u8, y, {name: checked}, batch_size, seed)
    return res["correct"][name].cpu(), stats, torch.cat(shown)[:n_show] if shown else None


def check_args(args):
    if not args.ckpt:
        raise ValueError("--ckpt is required (or --compare / --aggregate / --tradeoff with eval.json files)")
    if not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")
    for flag in ("n_examples", "batch_size", "aa_batch_size", "aa_queries", "n_show"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)!r}")
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps!r}")
    bad = [s for s in args.autoattack.split(",") if s.strip() and s.strip() not in NORMS]
    if bad:
        raise ValueError(f"--autoattack: unknown norm(s) {bad}; choose from {', '.join(NORMS)}")
    if not all(s.strip().isdigit() and int(s) > 0 for s in args.caat_pgd.split(",") if s.strip()):
        raise ValueError(f"--caat-pgd must be a comma list of positive step counts, got {args.caat_pgd!r}")
    attack_names(args.attacks)


def load_model(args, meta, dataset, device):
    """The model from our metadata (flags override it) or, for a plain state_dict, from the flags alone."""
    ds = DATASETS[dataset]
    norm_from = args.input_norm or ("metadata" if meta else "dataset")
    mean, std = {"metadata": (None, None), "dataset": (ds["mean"], ds["std"]),
                 "none": ((0.0,) * 3, (1.0,) * 3)}[norm_from]
    num_classes = args.num_classes or (None if meta else ds["num_classes"])
    return build_model_from_ckpt(args.ckpt, device, width=args.width, activation=args.activation,
                                 num_classes=num_classes, mean=mean, std=std)


def load_test_set(args, dataset, device):
    """The first --n-examples test images (uint8) and labels, through the shared data block; and the set's size."""
    data = make_datasets(argparse.Namespace(dataset=dataset, data_dir=args.data_dir, download=args.download,
                                            train_subset=0, test_subset=0, input_norm="dataset"), torch.device("cpu"))
    n = args.n_examples
    return data["test_x"][:n].to(device), data["test_y"][:n].to(device), len(data["test_y"])


def start_results(args, out, header, jobs):
    """A fresh results dict, or (--resume) the one in `out` after checking it was made with the same settings."""
    res = {**header, "attacks": {}, "pgd": {}, "autoattack": {}}
    if not out.exists():
        return res
    if not args.resume and not args.overwrite:
        raise FileExistsError(f"{out} exists; continue it with --resume, replace it with --overwrite, or choose "
                              f"another --out")
    if not args.resume:
        return res
    old = json.loads(out.read_text())
    for key in ("format", "ckpt", "dataset", "n", "seed", "batch_size"):
        if old.get(key) != res[key]:
            raise ValueError(f"--resume: {out} has {key} = {old.get(key)!r}, this run {res[key]!r}; use another --out")
    for group, key, _, settings, _, _ in jobs:
        done = old[group].get(key)
        if done is not None and done["kwargs"] != json.loads(json.dumps(settings["kwargs"])):
            raise ValueError(f"--resume: {group}/{key} in {out} was run with {done['kwargs']}, this run asks for "
                             f"{settings['kwargs']}; use another --out")
    res.update({g: old[g] for g in ("attacks", "pgd", "autoattack")}, clean_correct=old["clean_correct"])
    print(f"resuming {out}: {sum(len(old[g]) for g in ('attacks', 'pgd', 'autoattack'))} entries done", flush=True)
    return res


def main(args):
    try:   # the table modes: a foreign or incomplete file is a user error, one line
        if args.compare:
            text = compare(args.compare, args.labels)
            print(text)
            return text
        if args.aggregate or args.tradeoff:
            text, table = aggregate_seeds(args.aggregate) if args.aggregate else \
                tradeoff_matrix(args.tradeoff, args.tradeoff_sequential)
    except (ValueError, OSError) as e:
        make_parser().error(str(e))
    if args.aggregate or args.tradeoff:
        print(text)
        if args.out:
            Path(args.out).with_suffix(".md").write_text(text + "\n")
            write_json(Path(args.out).with_suffix(".json"), table)
        return table
    seed_everything(args.seed, args.deterministic)
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    meta = ckpt if isinstance(ckpt, dict) and "arch" in ckpt else {}
    dataset = args.dataset or meta.get("dataset", "cifar10")
    eps_table = load_eps_table(args.eps_table)
    out = Path(args.out) if args.out else Path(args.ckpt).parent / "eval.json"
    print(f"output: {out}", flush=True)

    model = load_model(args, meta, dataset, device)
    x_u8, y, n_total = load_test_set(args, dataset, device)
    num_classes = model.linear.out_features
    if int(y.max()) >= num_classes:
        raise ValueError(f"the model has {num_classes} classes but {dataset} labels go up to {int(y.max())}")
    scenario = args.scenario if args.scenario != "auto" else ("svhn" if dataset == "svhn" else "cifar")
    jobs = make_jobs(args, dataset, eps_table)
    header = {"format": FORMAT, "ckpt": str(Path(args.ckpt).resolve()), "dataset": dataset, "n": len(y),
              "seed": args.seed, "batch_size": args.batch_size,
              "label": args.label or Path(args.ckpt).resolve().parent.name,
              "data_label": f"first {len(y)} of the {n_total} {DATASET_NAMES.get(dataset, dataset)} test images"
                            f"{' under ' + args.data_dir if dataset != 'fake' else ''}",
              "model": {"width": model.conv1.out_channels, "num_classes": num_classes,
                        "activation": "softplus" if isinstance(model.layer1[0].act, nn.Softplus) else "relu",
                        "mean": model.normalize.mean.flatten().tolist(),
                        "std": model.normalize.std.flatten().tolist()},
              "config": {"attacks": args.attacks, "level": args.level, "steps": args.steps, "eps_table": eps_table,
                         "aa_version": args.aa_version, "caat_pgd": args.caat_pgd, "lp_source": args.lp_source}}
    res = start_results(args, out, header, jobs)
    out.parent.mkdir(parents=True, exist_ok=True)

    clean = evaluate(model, x_u8, y, {}, args.batch_size, args.seed)["correct"]["clean"].cpu()
    if "clean_correct" in res and res["clean_correct"] != bits(clean):
        raise ValueError(f"--resume: the clean predictions differ from those in {out} (another model or data?)")
    res.update(clean_acc=clean.float().mean().item(), clean_correct=bits(clean))
    print(f"{res['data_label']}: clean accuracy {res['clean_acc']:.4f}", flush=True)
    for group, key, _, _, _, _ in jobs:
        if key in res[group]:
            print(f"skip {job_title(group, key, res[group][key])}: already in {out}", flush=True)
    todo = [j for j in jobs if j[1] not in res[j[0]]]

    t_start, examples = time.time(), []
    for i, (group, key, fn, settings, norm, bs) in enumerate(todo):
        t0 = time.time()
        correct, stats, shown = run_job(model, x_u8, y, fn, key, norm, settings["eps"], bs, args.seed, args.n_show)
        res[group][key] = {**settings, "acc": correct.float().mean().item(), "pert": norm or "linf (latent-bounded)",
                           **stats, "time_s": time.time() - t0, "correct": bits(correct)}
        res["pending"] = [f"{g}/{k}" for g, k, *_ in todo[i + 1:]]
        res["complete"] = not res["pending"]
        write_outputs(res, out, y, num_classes, scenario, args.lp_source)   # after EVERY attack: a crash keeps it
        title = job_title(group, key, res[group][key])
        if shown is not None:
            examples.append((title, shown))
        elapsed = time.time() - t_start
        eta = elapsed / (i + 1) * (len(todo) - i - 1)   # mean time of the finished attacks x attacks left
        print(f"[{i + 1}/{len(todo)}] {title:<36} acc {res[group][key]['acc']:.4f} | max pert "
              f"{stats['max_pert']:.4g} ({res[group][key]['pert']}) | {hms(time.time() - t0)} | elapsed "
              f"{hms(elapsed)} | ETA {hms(eta)}", flush=True)
    res.update(pending=[], complete=True)
    text = write_outputs(res, out, y, num_classes, scenario, args.lp_source)
    print(f"\n{text}\nwritten: {out}, {out.with_suffix('.md')}", flush=True)
    if args.save_examples and examples:
        save_examples(args.save_examples, x_u8[: args.n_show].float().div(255), examples, args.n_show)
    return res


def write_outputs(res, out, y, num_classes, scenario, lp_source):
    """Recompute the aggregates, write eval.json atomically and eval.md next to it; returns the markdown."""
    summarize(res, y, num_classes, scenario, lp_source)
    write_json(out, res)
    text = markdown([res], [res["label"]])
    md = out.with_suffix(".md")
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, md)
    return text


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
