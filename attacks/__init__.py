"""The attacks of the CAS and CAAT reference implementations: one registry, one contract.

    from attacks import ATTACKS
    x_adv = ATTACKS["linf"](model, x, y)                     # CIFAR-10 defaults
    x_adv = ATTACKS["l2"](model, x, y, eps=0.5, steps=20)     # keyword-only hyper-parameters

Contract (every attack in ATTACKS; enforced for each registered name by tests/test_attacks.py):
 1. Inputs: `model(x) -> logits`; x float (B, C, H, W) in [0, 1] (normalisation lives inside the model);
    y long (B,). Any B >= 1, any H, W >= 16.
 2. Output: a new, detached tensor of the same shape, dtype and device, values in [0, 1], all finite.
 3. Budget: l_p attacks keep ||x_adv - x||_p <= eps per example; the others respect the latent constraint
    documented in their module.
 4. eps = 0 returns x unchanged.
 5. No side effects: model.training unchanged (the CALLER picks the mode), no parameter gains a .grad
    (gradients via torch.autograd.grad w.r.t. the attack's own variables), x and y are not mutated, no global
    state, nothing printed or downloaded.
 6. Randomness only from torch's global RNG (or a passed `generator=`): same seed -> same x_adv on CPU.
 7. Bad arguments raise ValueError naming the bad value.
 l_p attacks also take eps as a float or a per-sample (B,) tensor, direction=+1/-1 (adversary /
 anti-adversary; per-sample tensor allowed) and loss='ce'|'kl' (TRADES' KL against the clean output).

Groups: LP (3), PERCEPTUAL (1), SEMANTIC (17) and ALL (the papers' 21, in the order of CAS Fig. 5).
ATTACKS holds the attacks implemented so far; registered(names) validates user input against it.
`ppgd`'s "self" distance uses `model.features(x) -> list[Tensor]` when the model has it, else the maps taken by
forward hooks (per spatial size, the last 4-D output of any submodule; attacks/perceptual.py), so any model works.
"""

import inspect
import json
import math
import sys
from pathlib import Path

from attacks.lp import l1, l2, linf
# -- perceptual imports
from attacks.perceptual import ppgd
from attacks.autoattack import autoattack
# -- core semantic imports
from attacks.wood import wood
from attacks.elastic import elastic
from attacks.pixel import pixel
from attacks.snow import snow
from attacks.gabor import gabor
from attacks.jpeg import jpeg
from attacks.glitch import glitch
from attacks.kaleidoscope import kaleidoscope
# -- extra semantic imports
from attacks.blur import blur
from attacks.edge import edge
from attacks.fog import fog
from attacks.texture import texture
from attacks.prison import prison
from attacks.whirlpool import whirlpool
from attacks.polkadot import polkadot
from attacks.klotski import klotski
from attacks.hsv import hsv

LP = ("linf", "l2", "l1")
PERCEPTUAL = ("ppgd",)
SEMANTIC = ("wood", "elastic", "pixel", "snow", "gabor", "jpeg", "glitch", "kaleidoscope",   # core (8)
            "blur", "edge", "fog", "texture", "prison", "whirlpool", "polkadot", "klotski", "hsv")  # extra (9)
ALL = LP + PERCEPTUAL + SEMANTIC

# The registry: an explicit literal, one line per attack, grouped by family.
ATTACKS = {
    # l_p
    "linf": linf,
    "l2": l2,
    "l1": l1,
    # perceptual
    "ppgd": ppgd,
    # core semantic
    "wood": wood,
    "elastic": elastic,
    "pixel": pixel,
    "snow": snow,
    "gabor": gabor,
    "jpeg": jpeg,
    "glitch": glitch,
    "kaleidoscope": kaleidoscope,
    # extra semantic
    "blur": blur,
    "edge": edge,
    "fog": fog,
    "texture": texture,
    "prison": prison,
    "whirlpool": whirlpool,
    "polkadot": polkadot,
    "klotski": klotski,
    "hsv": hsv,
}

# Per-dataset default budgets (pixel units in [0, 1]); l_p: E-AT / CAS Section 5.1. Semantic attacks default to the
# CIFAR-10 "medium" values of their function signatures (CAS calibrates them with Eq. (11)).
DEFAULT_EPS = {
    "cifar10": {"linf": 8 / 255, "l2": 0.5, "l1": 12.0},
    "cifar100": {"linf": 8 / 255, "l2": 0.5, "l1": 12.0},
    "svhn": {"linf": 8 / 255, "l2": 0.5, "l1": 12.0},
}
# Full evaluation strength of the attacks without a LEVELS table: PGD-50 with the 2.5 eps / steps rule (Madry et al.
# 2018); APGD-l1 with AutoAttack's 100 iterations and evaluation sparsity 0.2 (Croce & Hein 2021); PPGD 40 iterations,
# the CIFAR-10 evaluation setting of Laidlaw et al. 2021 (its default 10 is their training setting).
EVAL_STRENGTH = {"linf": {"steps": 50}, "l2": {"steps": 50}, "l1": {"steps": 100, "sparsity": 0.2},
                 "ppgd": {"steps": 40}}
TRAIN_STEPS = 10   # training-time attacks: the paper gives no step count (README D8)


def attack_settings(name, mode="eval", *, dataset="cifar10", eps=None, steps=None, level="medium"):
    """Keyword arguments of ATTACKS[name] for training or evaluation: the one place that knows attack strength.

    Base setting: l_p the dataset's budget (DEFAULT_EPS); ppgd its defaults; a semantic attack its module's
    LEVELS[level] (the upstream CIFAR-10 low / medium / high table; its signature defaults are "medium").
    mode "eval": full strength (EVAL_STRENGTH for l_p and ppgd, the level's steps for the others); `steps` caps every
      attack at that many steps (quick runs).
    mode "train": l_p attacks run `steps` (default TRAIN_STEPS) steps, every other attack min(steps, its own steps).
    eps overrides the budget (e.g. a calibrated one, CAS Eq. (11)).
    Step-size rule (README D8): a latent attack's step is relative to its budget and to its step count:
      step = base_step * (eps / base_eps) * (base_steps / steps), and never more than eps -- so fewer steps travel the
      same relative distance, a calibrated eps moves the step with it, and no single step leaves the budget.
    l_p attacks keep their own rules (2.5 eps / steps for l_inf / l_2, APGD-l1's adaptive step), ppgd 2 eps / steps.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; registered attacks: {', '.join(ATTACKS)}")
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    fn = ATTACKS[name]
    params = inspect.signature(fn).parameters
    levels = getattr(sys.modules[fn.__module__], "LEVELS", None)
    if name in LP:
        base = {"eps": DEFAULT_EPS.get(dataset, DEFAULT_EPS["cifar10"])[name], **EVAL_STRENGTH[name]}
    elif levels is not None:
        if level not in levels:
            raise ValueError(f"level {level!r}: {fn.__module__}.LEVELS has only {sorted(levels)}")
        base = dict(levels[level])
    elif level == "medium":     # an attack without LEVELS: its signature defaults are its CIFAR-10 "medium" setting
        base = {k: params[k].default for k in ("eps", "steps", "step_size") if params.get(k, None) is not None
                and params[k].default is not None}
        base.update(EVAL_STRENGTH.get(name, {}))
    else:
        raise ValueError(f"level {level!r}: {fn.__module__} defines no LEVELS table, only its defaults (medium)")
    kw = dict(base)
    if mode == "train":
        kw.pop("sparsity", None)                  # APGD-l1 trains with its own (E-AT) sparsity default
        n = TRAIN_STEPS if steps is None else int(steps)
        kw["steps"] = n if name in LP else min(n, base["steps"])
    elif steps:
        kw["steps"] = min(int(steps), base["steps"])
    if eps is not None:
        kw["eps"] = float(eps)
    if isinstance(base.get("step_size"), (int, float)) and kw["steps"] > 0 and base["eps"] > 0:
        step = base["step_size"] * (kw["eps"] / base["eps"]) * (base["steps"] / kw["steps"])
        kw["step_size"] = min(step, kw["eps"])   # README D8: relative to eps and steps, at most eps
    return kw


def load_eps_table(path):
    """An ε table, JSON {attack: eps} (or {"eps": {attack: eps}}): registered names, finite eps >= 0. {} for no path.

    The format cas.py --calibrate writes (eps_table.json) and cas.py / eval.py --eps-table read (CAS Eq. (11)).
    """
    if not path:
        return {}
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--eps-table {path}: cannot read a JSON object ({e})") from e
    table = table["eps"] if isinstance(table, dict) and isinstance(table.get("eps"), dict) else table
    if not isinstance(table, dict):
        raise ValueError(f"--eps-table {path}: expected a JSON object {{attack: eps}}, got {type(table).__name__}")
    registered(list(table))
    bad = {k: v for k, v in table.items() if not isinstance(v, (int, float)) or not 0 <= v < math.inf}
    if bad:
        raise ValueError(f"--eps-table {path}: eps must be finite numbers >= 0, got {bad}")
    return {k: float(v) for k, v in table.items()}


def registered(names):
    """Validate a comma string or list of attack names against ATTACKS; return them as a list (order kept)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in names if n not in ATTACKS]
    if bad or not names:
        raise ValueError(f"unknown attack(s) {bad or names!r}; registered attacks: {', '.join(ATTACKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"attack names must be unique, got {names!r}")
    return list(names)


__all__ = ["ATTACKS", "ALL", "LP", "PERCEPTUAL", "SEMANTIC", "DEFAULT_EPS", "EVAL_STRENGTH", "attack_settings",
           "load_eps_table", "registered"] + list(ATTACKS)
__all__ += ["autoattack"]   # AutoAttack runner: evaluation only, not an entry of ATTACKS
