"""Side-by-side check (hand-run, not CI): our 17 semantic attacks against the upstream code they reimplement.

Upstream = https://github.com/centerforaisafety/adversarial-corruptions (Kaufmann et al. 2023, "Testing Robustness
Against Unforeseen Adversaries"). It is NOT a dependency: clone it anywhere (its submodules are not needed, only
attacks/, config.py, parse_args.py, models.sh, models/cifar10/cifar10_config.py) and pass the work tree:

    git clone https://github.com/centerforaisafety/adversarial-corruptions /tmp/upstream_ac
    OMP_NUM_THREADS=1 python -m tests.upstream_semantic_check --upstream /tmp/upstream_ac \
        --ckpt runs/cpu/pgdat_w16/model.pt --data-dir data/cifar10 --n 200 --seeds 0,1,2 \
        --out runs/upstream_check.json

Its modules are imported from that path at run time only (never copied here); its package is also called
`attacks`, so it is imported with our `attacks` modules set aside in sys.modules and restored afterwards. It needs
torch, torchvision, numpy and scipy, which we have (its main.py / evaluate.py, which need timm and jsonlines, are
not imported).

Settings. Upstream: an attack is `attacks.<name>.get_attack(model, args).generate_attack((x, y))`, args built as
upstream main.py builds them for `--dataset cifar10 --epsilon <level> --attack_config
attacks/attack_params_cifar10_default.conf $(get_attack_params <name> cifar10)` (eval.sh): eps from
models/cifar10/cifar10_config.py default_epsilons[name][level], --step_size / --num_steps from models.sh, the
per-attack parameters from the .conf section (typed by parse_args.py). Ours: ATTACKS[name](model, x, y,
**attack_settings(name, "eval", level=level)). Both are printed side by side (and stored under "settings").
Models get x in [0, 1] (normalisation inside the model, as upstream's wrappers do).

Protocol: the first --n test images in batches of --batch; per attack, seed and batch i both implementations run
on the same images and labels after seeding python, numpy and torch with 1000 * seed + i; accuracy of the model on
the returned images (upstream's output is evaluated as returned, like upstream evaluate.py; its range is
recorded), wall and process-CPU seconds per call (one call = one batch). Variants "gabor+redraw" / "gabor+fixed"
run our gabor with redraw_kernel=True (upstream's per-step kernel re-draw) / False (one kernel per call) against
upstream gabor.

Results go to --out (JSON, rewritten atomically after every (attack, seed, side); rerunning skips what is there).
A markdown table is printed at the end. test_matches_upstream (below) is the opt-in pytest version.
"""

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import random
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

SEMANTIC = ("wood", "elastic", "pixel", "snow", "gabor", "jpeg", "glitch", "kaleidoscope",
            "blur", "edge", "fog", "texture", "prison", "whirlpool", "polkadot", "klotski", "hsv")
VARIANTS = {"gabor+redraw": ("gabor", {"redraw_kernel": True}),   # name -> (attack, extra kwargs of ours)
            "gabor+fixed": ("gabor", {"redraw_kernel": False})}
LEVELS = ("low", "medium", "high")
TOLERANCE = {"gabor": 15.0}        # |ours - upstream| in accuracy points allowed by the pytest check
DEFAULT_TOLERANCE = 10.0
NOT_PARAMS = ("model", "x", "y", "direction", "loss_fn", "generator")


# --- upstream --------------------------------------------------------------------------------------------------
def _owned(name):
    """Modules that upstream and this repository (or the upstream import) would both claim."""
    return name in ("attacks", "config", "parse_args") or name.startswith(("attacks.", "models."))


@contextlib.contextmanager
def _upstream_imports(root):
    """Import from the upstream work tree with our clashing modules set aside; restore them on exit."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if _owned(k)}
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if _owned(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


class Upstream:
    """The upstream attack modules and their CIFAR-10 settings, loaded from a work tree."""

    def __init__(self, root, names, device):
        self.root = Path(root)
        if not (self.root / "attacks" / "attacks.py").is_file():
            raise FileNotFoundError(f"--upstream {root}: no attacks/attacks.py (not the adversarial-corruptions tree)")
        self.device = device
        self.models_sh = (self.root / "models.sh").read_text()
        with _upstream_imports(self.root):
            self.config = importlib.import_module("config")
            self.config.device = device          # glitch / fog build tensors on config.device at import time
            src = importlib.util.spec_from_file_location(
                "upstream_cifar10_config", self.root / "models" / "cifar10" / "cifar10_config.py")
            src.loader.exec_module(cfg := importlib.util.module_from_spec(src))
            self.default_epsilons = cfg.default_epsilons
            parse_args = importlib.import_module("parse_args")
            parse_args.config = self.config      # parse_args.py uses config.attack_list without importing it
            self.parser = parse_args.get_parser()
            self.modules = {n: importlib.import_module(f"attacks.{n}") for n in names}

    def step_params(self, name):
        """(step_size, num_steps) of `get_attack_params <name> cifar10` in models.sh."""
        m = re.search(rf"^\s*{re.escape(name)}-cifar10\s*\)\s*echo\s+\"([^\"]*)\"", self.models_sh, re.M)
        if m is None:
            raise ValueError(f"models.sh has no cifar10 entry for {name!r}")
        kv = dict(re.findall(r"--(\w+)=(\S+)", m.group(1)))
        return float(kv["step_size"]), int(kv["num_steps"])

    def args(self, name, level):
        """The argparse Namespace upstream main.py (init_args) builds for this attack on CIFAR-10 at `level`,
        and the names of the parameters that came from the attack's .conf section."""
        import configparser
        step_size, num_steps = self.step_params(name)
        args = self.parser.parse_args(["--architecture", "-", "--weights", "-", "--dataset", "cifar10",
                                       "--attack", name, "--device", self.device, "--epsilon", level,
                                       "--step_size", str(step_size), "--num_steps", str(num_steps)])
        args.epsilon = self.default_epsilons[name][LEVELS.index(level)]
        conf = configparser.ConfigParser()
        conf.read(self.root / "attacks" / "attack_params_cifar10_default.conf")
        keys = []
        for action in self.parser._actions:            # as init_args: typed values of the attack's section
            if action.dest in conf[name] and getattr(args, action.dest) is None:
                setattr(args, action.dest, action.type(conf.get(name, action.dest)))
                keys.append(action.dest)
        return args, keys

    def settings(self, name, level):
        a, keys = self.args(name, level)
        return {"eps": a.epsilon, "steps": a.num_steps, "step_size": a.step_size, **{k: getattr(a, k) for k in keys}}

    def run(self, name, level, model, x, y):
        attack = self.modules[name].get_attack(model, self.args(name, level)[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")            # upstream's meshgrid / grid_sample default warnings
            return attack.generate_attack((x.clone(), y.clone())).detach()


# --- ours ------------------------------------------------------------------------------------------------------
def our_settings(name, level):
    """(keyword arguments of the call, all parameters incl. signature defaults) of our attack."""
    import inspect
    import attacks
    base, extra = VARIANTS.get(name, (name, {}))
    kw = {**attacks.attack_settings(base, "eval", dataset="cifar10", level=level), **extra}
    params = {k: p.default for k, p in inspect.signature(attacks.ATTACKS[base]).parameters.items()
              if k not in NOT_PARAMS}
    return kw, {**params, **kw}


def run_ours(name, level, model, x, y):
    import attacks
    kw, _ = our_settings(name, level)
    return attacks.ATTACKS[VARIANTS.get(name, (name,))[0]](model, x, y, **kw)


# --- protocol --------------------------------------------------------------------------------------------------
def seed_all(seed):
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(ckpt, data_dir, n, device):
    import eval as eval_script   # eval.py, the evaluation script (not the builtin)
    model = eval_script.build_model_from_ckpt(ckpt, device=device).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    x_u8, y = eval_script.read_split("cifar10", Path(data_dir), train=False)
    return model, eval_script.to_float(x_u8[:n]).to(device), y[:n].to(device)


def measure(side, name, level, seed, model, x, y, batch, upstream=None):
    """Accuracy (%) on the returned images, seconds per call (wall and CPU), output range; one call per batch."""
    correct, wall, cpu, lo, hi = 0, [], [], math.inf, -math.inf
    for i, s in enumerate(range(0, len(y), batch)):
        xb, yb = x[s:s + batch], y[s:s + batch]
        seed_all(1000 * seed + i)
        t, c = time.perf_counter(), time.process_time()
        if side == "upstream":
            adv = upstream.run(VARIANTS.get(name, (name,))[0], level, model, xb, yb)
        else:
            adv = run_ours(name, level, model, xb, yb)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        with torch.no_grad():
            correct += int((model(adv).argmax(1) == yb).sum())
        lo, hi = min(lo, adv.min().item()), max(hi, adv.max().item())
    return {"acc": 100.0 * correct / len(y), "s_per_call": statistics.mean(wall),
            "cpu_s_per_call": statistics.mean(cpu), "calls": len(wall), "min": lo, "max": hi,
            "in_01": bool(lo >= -1e-6 and hi <= 1 + 1e-6)}


def mean_std(v):
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def summarise(res, names, seeds):
    """Per attack: both accuracies (mean, std over seeds), the difference, seconds per call and their ratio."""
    rows = {}
    for name in names:
        got = {side: [res["runs"].get(f"{name}/{s}/{side}") for s in seeds] for side in ("upstream", "ours")}
        if any(r is None for v in got.values() for r in v):
            continue
        (ua, us), (oa, os_) = (mean_std([r["acc"] for r in got[side]]) for side in ("upstream", "ours"))
        ut, ot = (statistics.mean(r["s_per_call"] for r in got[side]) for side in ("upstream", "ours"))
        uc, oc = (statistics.mean(r["cpu_s_per_call"] for r in got[side]) for side in ("upstream", "ours"))
        rows[name] = {"upstream_acc": ua, "upstream_std": us, "ours_acc": oa, "ours_std": os_, "diff": oa - ua,
                      "upstream_s": ut, "ours_s": ot, "ratio": ot / ut, "cpu_ratio": oc / uc,
                      "upstream_in_01": all(r["in_01"] for r in got["upstream"])}
    return rows


def table(res, rows):
    n, seeds = res["config"]["n"], res["config"]["seeds"]
    lines = [f"clean accuracy {res['clean_acc']:.1f}% ({n} images); {len(seeds)} seed(s) {seeds}; "
             f"level {res['config']['level']}; batch {res['config']['batch']} (s/call = one batch)", "",
             "| attack | upstream acc % | ours acc % | ours − upstream (pts) | upstream s/call | ours s/call "
             "| time ratio ours/up (wall, cpu) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        flag = "" if r["upstream_in_01"] else " (upstream output outside [0,1])"
        lines.append(f"| {name}{flag} | {r['upstream_acc']:.1f} ± {r['upstream_std']:.1f} | {r['ours_acc']:.1f} ± "
                     f"{r['ours_std']:.1f} | {r['diff']:+.1f} | {r['upstream_s']:.2f} | {r['ours_s']:.2f} | "
                     f"{r['ratio']:.2f}, {r['cpu_ratio']:.2f} |")
    return "\n".join(lines)


def settings_text(settings):
    out = []
    for name, s in settings.items():
        u, o = s["upstream"], s["ours"]
        same = all(math.isclose(float(u[k]), float(o[k]), rel_tol=1e-9) for k in ("eps", "steps", "step_size"))
        out.append(f"{name:13s} eps/steps/step  upstream {u['eps']:.6g} / {u['steps']} / {u['step_size']:g}   "
                   f"ours {o['eps']:.6g} / {o['steps']} / {o['step_size']:g}   {'same' if same else 'DIFFERENT'}")
        for side, d in (("upstream", u), ("ours", o)):
            rest = {k: v for k, v in d.items() if k not in ("eps", "steps", "step_size")}
            out.append(f"{'':13s} {side + ' params':15s} {json.dumps(rest, default=str)}")
    return "\n".join(out)


def run_check(upstream_root, ckpt, data_dir, n, seeds, names, level="medium", batch=20, device="cpu", out=None,
              log=print):
    """Run (or resume) the comparison; returns the results dict (also written to `out` when given)."""
    import eval as eval_script
    bases = sorted({VARIANTS.get(nm, (nm,))[0] for nm in names})
    up = Upstream(upstream_root, bases, device)
    model, x, y = load_data(ckpt, data_dir, n, device)
    config = {"upstream": str(upstream_root), "ckpt": str(ckpt), "n": len(y), "level": level, "batch": batch,
              "device": device}
    out = Path(out) if out else None
    res = json.loads(out.read_text()) if out and out.exists() else {}
    if res and {k: res["config"].get(k) for k in config} != config:
        raise SystemExit(f"{out} holds a run with other settings {res['config']}; choose another --out")
    res.setdefault("runs", {})
    res["config"] = {**config, "seeds": list(seeds), "attacks": list(names)}
    with torch.no_grad():
        res["clean_acc"] = 100.0 * (model(x).argmax(1) == y).float().mean().item()
    res["threads"], res["torch"] = torch.get_num_threads(), torch.__version__
    res["settings"] = {}
    for nm in names:
        _, ours_all = our_settings(nm, level)
        res["settings"][nm] = {"upstream": up.settings(VARIANTS.get(nm, (nm,))[0], level),
                               "ours": {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                        for k, v in ours_all.items()}}
    log(settings_text(res["settings"]))
    log(f"clean accuracy {res['clean_acc']:.1f}% on {len(y)} images")
    if "edge" in up.modules:   # edge and texture share the detector: ours must give upstream's mask, pixel for pixel
        from attacks._edges import CANNY_THRESHOLD, canny_edges
        theirs = up.modules["edge"].CannyFilter()(x, CANNY_THRESHOLD)[-1].to(x.dtype)
        res["canny_pixels_differing"] = int((theirs != canny_edges(x)).sum())
        log(f"Canny edge masks: {res['canny_pixels_differing']} of {theirs.numel()} pixels differ from upstream's")

    def save():
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            eval_script.write_json(out, res)

    save()
    for nm in names:
        for seed in seeds:
            for side in ("upstream", "ours"):
                key = f"{nm}/{seed}/{side}"
                if key in res["runs"]:
                    continue
                r = measure(side, nm, level, seed, model, x, y, batch, upstream=up)
                res["runs"][key] = r
                save()
                log(f"{key:28s} acc {r['acc']:5.1f}%  {r['s_per_call']:7.2f} s/call  "
                    f"range [{r['min']:.3f}, {r['max']:.3f}]")
    res["summary"] = summarise(res, names, seeds)
    save()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--upstream", required=True, help="work tree of centerforaisafety/adversarial-corruptions")
    p.add_argument("--ckpt", required=True, help="model.pt of our scripts (eval.build_model_from_ckpt)")
    p.add_argument("--data-dir", default="./data/cifar10", help="CIFAR-10 files (cifar-10-batches-py/)")
    p.add_argument("--n", type=int, default=200, help="first N test images")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--attacks", default=",".join(SEMANTIC), help=f"comma list; also {', '.join(VARIANTS)}")
    p.add_argument("--level", default="medium", choices=LEVELS)
    p.add_argument("--batch", type=int, default=20, help="images per attack call (upstream eval.sh: 5)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/upstream_check.json")
    args = p.parse_args(argv)
    names = [a for a in args.attacks.split(",") if a]
    bad = [a for a in names if a not in SEMANTIC and a not in VARIANTS]
    if bad:
        p.error(f"unknown attack(s) {bad}; choose from {', '.join(SEMANTIC + tuple(VARIANTS))}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    res = run_check(args.upstream, args.ckpt, args.data_dir, args.n, seeds, names, level=args.level,
                    batch=args.batch, device=args.device, out=args.out, log=lambda m: print(m, flush=True))
    print()
    print(table(res, res["summary"]))


def test_matches_upstream(tmp_path):
    """Opt-in: set UPSTREAM_ADVERSARIAL_CORRUPTIONS (work tree), UPSTREAM_CHECK_CKPT, UPSTREAM_CHECK_DATA.

    64 images, seed 0, all 17 attacks at medium: |ours - upstream| <= 10 accuracy points (gabor 15), and the
    Canny edge masks of edge / texture identical to upstream's.
    """
    import pytest
    env = {k: os.environ.get(k) for k in ("UPSTREAM_ADVERSARIAL_CORRUPTIONS", "UPSTREAM_CHECK_CKPT",
                                          "UPSTREAM_CHECK_DATA")}
    if not all(env.values()):
        pytest.skip("set UPSTREAM_ADVERSARIAL_CORRUPTIONS, UPSTREAM_CHECK_CKPT and UPSTREAM_CHECK_DATA to run")
    res = run_check(env["UPSTREAM_ADVERSARIAL_CORRUPTIONS"], env["UPSTREAM_CHECK_CKPT"], env["UPSTREAM_CHECK_DATA"],
                    64, [0], list(SEMANTIC), batch=64, out=tmp_path / "upstream.json", log=lambda m: None)
    assert res["canny_pixels_differing"] == 0
    rows = res["summary"]
    far = {k: round(r["diff"], 1) for k, r in rows.items() if abs(r["diff"]) > TOLERANCE.get(k, DEFAULT_TOLERANCE)}
    assert not far, f"ours - upstream accuracy (points) beyond tolerance: {far}\n{table(res, rows)}"


if __name__ == "__main__":
    main()
