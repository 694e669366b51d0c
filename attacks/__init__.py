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
A model used with `ppgd`'s "self" distance must expose `features(x) -> list[Tensor]`.
"""

from attacks.lp import l1, l2, linf
# -- perceptual imports (issue 5)
from attacks.perceptual import ppgd
from attacks.autoattack import autoattack
# -- core semantic imports (issue 3)
from attacks.wood import wood
from attacks.elastic import elastic
from attacks.pixel import pixel
from attacks.snow import snow
from attacks.gabor import gabor
from attacks.jpeg import jpeg
from attacks.glitch import glitch
from attacks.kaleidoscope import kaleidoscope
# -- extra semantic imports (issue 4)
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
    # perceptual (issue 5)
    "ppgd": ppgd,
    # core semantic (issue 3)
    "wood": wood,
    "elastic": elastic,
    "pixel": pixel,
    "snow": snow,
    "gabor": gabor,
    "jpeg": jpeg,
    "glitch": glitch,
    "kaleidoscope": kaleidoscope,
    # extra semantic (issue 4)
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


__all__ = ["ATTACKS", "ALL", "LP", "PERCEPTUAL", "SEMANTIC", "DEFAULT_EPS", "registered"] + list(ATTACKS)
__all__ += ["autoattack"]   # AutoAttack runner: evaluation only, not an entry of ATTACKS (issue 5)
