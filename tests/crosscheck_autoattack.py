"""Cross-check (not a test): our AutoAttack components against torchattacks, AutoAttack vs PGD-10, and PPGD.

torchattacks is NOT a dependency of this project. Install it outside the project's environment, e.g.

    pip install --no-deps --target /tmp/ta torchattacks          # it needs only torch, which we have
    python -m tests.crosscheck_autoattack --ckpt runs/cpu/pretrain_linf15/model.pt \
        --data-dir data/cifar10 --torchattacks-path /tmp/ta --out runs/cpu/crosscheck.json

What it measures, on the first --n-examples test images (one seed, CPU deterministic):
1. every AutoAttack component (APGD-CE, APGD-T, FAB-T, Square) for linf and l2, run on its own on the clean-correct
   points, by attacks/autoattack.py and by torchattacks with AutoAttack's iteration counts (100 iterations, 9
   target classes, 5000 Square queries; note that torchattacks' own AutoAttack wrapper leaves APGD at its default
   10 steps, so the components are built here). Both sides' candidates go through the same acceptance check
   (misclassified, inside the eps-ball with 1e-5 relative slack, inside [0,1]). Robust accuracy per component and
   of their union (= AutoAttack standard: our runner's outcome is exactly the AND over components run alone), the
   number of points on which the two libraries disagree, and wall-clock.
2. AutoAttack standard (our union) for linf, l2 and l1 next to 10-step PGD, point-wise: the points that PGD-10
   breaks but AutoAttack does not (must be 0 for AutoAttack to be at least as strong).
3. PPGD at bound 0.5 (40 iterations, lpips_net="self"): robust accuracy, mean LPIPS distance reached, and the cost
   of one PPGD iteration relative to one linf PGD step (same points, same model).

Results go to --out (JSON, rewritten after every measurement; rerunning skips what is already there).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import attacks
import cas
import eval as eval_script   # eval.py, the evaluation script (not the builtin)
from attacks.autoattack import DEFAULT_EPS, SETTINGS, accept_adversarial, run_component
from attacks.perceptual import feature_fn, lpips_distance

COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
TA_NORM = {"linf": "Linf", "l2": "L2"}


def torchattacks_component(ta, name, model, norm, eps, n_classes, seed):
    """The torchattacks attack object for one AutoAttack component with AutoAttack's standard settings."""
    n, cfg = TA_NORM[norm], SETTINGS[norm]
    if name == "apgd-ce":
        return ta.APGD(model, norm=n, eps=eps, steps=100, n_restarts=cfg["ce_restarts"], loss="ce", seed=seed)
    if name == "apgd-t":   # torchattacks attacks the n_classes - 1 highest non-true classes, one restart each
        return ta.APGDT(model, norm=n, eps=eps, steps=100, n_restarts=1, n_classes=n_classes, seed=seed)
    if name == "fab-t":
        return ta.FAB(model, norm=n, eps=eps, steps=100, n_restarts=1, multi_targeted=True, n_classes=n_classes,
                      seed=seed)
    return ta.Square(model, norm=n, eps=eps, n_queries=5000, n_restarts=1, p_init=0.8, seed=seed)


def timed(fn):
    """(fn(), wall seconds); the process CPU seconds of the last call are kept in timed.cpu (fair under load)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    timed.cpu = time.process_time() - c
    return out, time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="model.pt of our scripts")
    p.add_argument("--data-dir", default="./data", help="CIFAR-10 files (cifar-10-batches-py/)")
    p.add_argument("--n-examples", type=int, default=500)
    p.add_argument("--torchattacks-path", default="", help="folder holding the torchattacks package ('' = skip it)")
    p.add_argument("--norms", default="linf,l2", help="norms of the component cross-check")
    p.add_argument("--aa-norms", default="linf,l2,l1", help="norms of AutoAttack vs PGD-10")
    p.add_argument("--ppgd", action=argparse.BooleanOptionalAction, default=True, help="run part 3 (PPGD)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="crosscheck.json")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    model = eval_script.build_model_from_ckpt(args.ckpt).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    x_u8, y = cas.read_split("cifar10", Path(args.data_dir), train=False)
    x, y = cas.to_float(x_u8[: args.n_examples]), y[: args.n_examples]
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    out_path = Path(args.out)
    res = json.loads(out_path.read_text()) if out_path.exists() else {}
    res.update({"ckpt": args.ckpt, "n_examples": len(y), "clean_acc": 100 * correct.float().mean().item(),
                "threads": torch.get_num_threads(), "torch": torch.__version__})

    def save():
        cas.write_json(out_path, res)

    def record(key, robust, seconds, extra=None):
        res[key] = {"robust_acc": 100 * robust.float().mean().item(), "seconds": round(seconds, 1),
                    "cpu_seconds": round(timed.cpu, 1),
                    "robust": [int(b) for b in robust.tolist()], **(extra or {})}
        save()
        print(f"{key:28s} robust {res[key]['robust_acc']:5.1f}%  {seconds:7.1f} s", flush=True)

    def mask(key):
        return torch.tensor(res[key]["robust"], dtype=torch.bool)

    ta = None
    if args.torchattacks_path:
        sys.path.insert(0, args.torchattacks_path)
        import torchattacks as ta
        res["torchattacks"] = ta.__version__
    idx = correct.nonzero().squeeze(1)

    def run_ours(norm, comp):
        """Our component alone on the clean-correct points, through the shared acceptance check (skipped if done)."""
        key, eps = f"ours/{norm}/{comp}", DEFAULT_EPS[norm]
        if key in res:
            return
        (cand, _), sec = timed(lambda: run_component(comp, model, x, y, correct, norm=norm, eps=eps, seed=args.seed))
        broken = torch.zeros_like(correct)
        broken[idx] = accept_adversarial(model, x[idx], y[idx], cand[idx], norm=norm, eps=eps)
        record(key, correct & ~broken, sec)

    # 1. component cross-check ---------------------------------------------------------------------------------
    for norm in [n for n in args.norms.split(",") if n]:
        eps = DEFAULT_EPS[norm]
        for comp in COMPONENTS:
            run_ours(norm, comp)
            key = f"torchattacks/{norm}/{comp}"
            if ta is not None and key not in res:
                atk = torchattacks_component(ta, comp, model, norm, eps, 10, args.seed)
                adv, sec = timed(lambda: atk(x[idx], y[idx]))
                broken = torch.zeros_like(correct)
                broken[idx] = accept_adversarial(model, x[idx], y[idx], adv, norm=norm, eps=eps)
                record(key, correct & ~broken, sec)
    # 2. AutoAttack standard (union of the components) vs PGD-10, point-wise -------------------------------------
    for norm in [n for n in args.aa_norms.split(",") if n]:
        eps = DEFAULT_EPS[norm]
        for comp in COMPONENTS:
            run_ours(norm, comp)
        key = f"pgd10/{norm}"
        if key not in res:
            gen = torch.Generator().manual_seed(args.seed)
            adv, sec = timed(lambda: attacks.ATTACKS[norm](model, x, y, eps=eps, steps=10, generator=gen))
            with torch.no_grad():
                record(key, model(adv).argmax(1) == y, sec)
        for lib in ("ours", "torchattacks"):
            keys = [f"{lib}/{norm}/{c}" for c in COMPONENTS]
            if all(k in res for k in keys):
                aa = correct.clone()
                for k in keys:
                    aa &= mask(k)
                pgd = mask(f"pgd10/{norm}")
                res[f"{lib}/{norm}/autoattack"] = {
                    "robust_acc": 100 * aa.float().mean().item(),
                    "seconds": round(sum(res[k]["seconds"] for k in keys), 1),
                    "cpu_seconds": round(sum(res[k].get("cpu_seconds", float("nan")) for k in keys), 1),
                    "pgd10_breaks_aa_does_not": int((aa & ~pgd).sum()),
                    "aa_breaks_pgd10_does_not": int((~aa & pgd).sum())}
                save()
        if all(f"{lib}/{norm}/autoattack" in res for lib in ("ours", "torchattacks")):
            a, b = (torch.ones(len(y), dtype=torch.bool) for _ in range(2))
            for c in COMPONENTS:
                a &= mask(f"ours/{norm}/{c}")
                b &= mask(f"torchattacks/{norm}/{c}")
                res[f"disagree/{norm}/{c}"] = int((mask(f"ours/{norm}/{c}") != mask(f"torchattacks/{norm}/{c}")).sum())
            res[f"disagree/{norm}/autoattack"] = int((a != b).sum())
            save()
    # 3. PPGD at bound 0.5 -------------------------------------------------------------------------------------
    if args.ppgd and "ppgd" not in res:
        gen = torch.Generator().manual_seed(args.seed)
        xs, ys = x[idx], y[idx]
        adv, sec = timed(lambda: attacks.ATTACKS["ppgd"](model, xs, ys, eps=0.5, steps=40, generator=gen))
        with torch.no_grad():
            robust = correct.clone()
            robust[idx] = model(adv).argmax(1) == ys
            dist = lpips_distance(feature_fn(model, "self"), xs, adv)
        # cost per iteration: (t(40 it) - t(0 it)) / 40 vs the same for a linf PGD step on the same points
        _, sec0 = timed(lambda: attacks.ATTACKS["ppgd"](model, xs, ys, eps=0.5, steps=0, generator=gen))
        _, lin10 = timed(lambda: attacks.ATTACKS["linf"](model, xs, ys, steps=10, generator=gen))
        _, lin0 = timed(lambda: attacks.ATTACKS["linf"](model, xs, ys, steps=0, generator=gen))
        per_it, per_step = (sec - sec0) / 40, (lin10 - lin0) / 10
        timed.cpu = float("nan")   # the CPU time of the 40-iteration call was overwritten by the timing calls
        record("ppgd", robust, sec, {"eps": 0.5, "steps": 40, "lpips_net": "self",
                                     "mean_lpips": dist.mean().item(), "max_lpips": dist.max().item(),
                                     "s_per_iteration": per_it, "s_per_linf_step": per_step,
                                     "iteration_vs_linf_step": per_it / per_step})
    print(json.dumps({k: (v if not isinstance(v, dict) else {a: b for a, b in v.items() if a != "robust"})
                      for k, v in res.items()}, indent=1))


if __name__ == "__main__":
    main()
