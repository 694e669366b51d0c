"""One-call GPU check -- whoever has a GPU at hand runs it first:  python -m tests.gpu_check [--out check.json]

On the device, with synthetic CIFAR-sized data (nothing is downloaded, nothing large is carried), it prints one table:
  contract  every registered attack, the model's forward in fp32 and under bf16 autocast (AttackModel): shape, dtype,
            device, [0, 1], finite, eps = 0 identity, l_p budget, mode kept, no parameter .grad
  scripts   a few iterations of cas.py (CAS, SAT, AVG), caat_meta.py, caat_reinforce.py, and eval.py with every
            attack and AutoAttack on cas.py's model (subprocesses, --dataset fake, on the device)
  bf16      robust accuracy of a briefly PGD-trained model under fp32 and bf16 attacks (same images, same seed)
  bench     tests.bench at width 64, batch 128: ms per iteration of CAS / SAT / AVG, CAS/SAT, the model-pass
            fraction, every attack's step vs linf, and 10 CAS epochs at paper scale (391 iterations of 128)
Budget: under 8 minutes on one H100/H200. `--device cpu --quick` runs the same at toy sizes (how the check itself is
tested on machines without a GPU).
"""

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attacks
import cas
from tests import bench

ROOT = Path(__file__).resolve().parents[1]
LP = {"linf": float("inf"), "l2": 2.0, "l1": 1.0}


def contract(model, device, bf16, n=8):
    """Failures of the attack contract, per attack (empty list: it holds)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)
    wrapped = cas.attack_model(model, bf16)
    bad = {}
    for name, fn in attacks.ATTACKS.items():
        torch.manual_seed(0)
        out, zero = fn(wrapped, x, y, steps=2), fn(wrapped, x, y, steps=2, eps=0.0)
        err = [what for what, ok in (
            ("shape/dtype/device", out.shape == x.shape and out.dtype == x.dtype and out.device == x.device),
            ("outside [0, 1] or not finite", bool(torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1)),
            ("eps = 0 is not the identity", (zero - x).abs().max().item() <= 1e-6),
            ("mode changed or .grad written", not model.training and all(p.grad is None for p in model.parameters())),
            ("over budget", name not in LP or bool(((out - x).flatten(1).norm(p=LP[name], dim=1) <= inspect.signature(
                fn).parameters["eps"].default * (1 + 1e-5) + 1e-6).all())),
        ) if not ok]
        if err:
            bad[name] = err
    return bad


def scripts(device, quick):
    """(name, ok, seconds, last line of output) for short runs of every script on fake data."""
    tmp, w = Path(tempfile.mkdtemp(prefix="gpu_check_")), "8" if quick else "16"
    common = ["--dataset", "fake", "--device", device, "--width", w, "--attack-steps", "2", "--eval-examples", "32"]
    runs = [("cas.py (cas)", ["cas.py", *common, "--pretrain-epochs", "1", "--epochs", "1", "--max-steps", "3",
                              "--eval-attack-steps", "2", "--attacks", "linf,l1,ppgd,fog,jpeg",
                              "--out-dir", tmp / "cas"]),
            ("cas.py (sat)", ["cas.py", *common, "--sampler", "sat", "--init-ckpt", tmp / "cas" / "model.pt",
                              "--epochs", "1", "--max-steps", "3", "--eval-attack-steps", "2",
                              "--out-dir", tmp / "sat"]),
            ("cas.py (avg)", ["cas.py", *common, "--sampler", "avg", "--init-ckpt", tmp / "cas" / "model.pt",
                              "--epochs", "1", "--max-steps", "3", "--eval-attack-steps", "2", "--attacks",
                              "linf,l2,l1" if quick else ",".join(attacks.ALL), "--out-dir", tmp / "avg"]),
            ("caat_meta.py", ["caat_meta.py", *common, "--epochs", "1", "--max-steps", "3", "--out-dir", tmp / "meta"]),
            ("caat_reinforce.py", ["caat_reinforce.py", *common, "--epochs", "1", "--max-steps", "3",
                                   "--out-dir", tmp / "rl"]),
            ("eval.py (all + AA)", ["eval.py", "--ckpt", tmp / "cas" / "model.pt", "--dataset", "fake", "--device",
                                    device, "--n-examples", "64", "--steps", "2", "--autoattack", "linf",
                                    "--aa-queries", "50", "--out", tmp / "eval.json"])]
    out = []
    for name, argv in runs:
        t0 = time.time()
        proc = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=ROOT,
                              timeout=600)
        text = (proc.stdout + proc.stderr).strip().splitlines()
        out.append((name, proc.returncode == 0, time.time() - t0, text[-1].replace(str(tmp), "TMP") if text else ""))
    return out


def bf16_vs_fp32(device, quick):
    """Robust accuracy (%) under fp32 and bf16 attacks of a PreActResNet-18 PGD-trained for a few hundred steps."""
    torch.manual_seed(0)
    n_train, n_test, iters = (512, 128, 30) if quick else (8192, 1000, 400)
    (tx, ty), (vx, vy) = cas.fake_split(n_train, 0), cas.fake_split(n_test, 1)
    model = cas.build_model(10, (0.5,) * 3, (0.25,) * 3, 8 if quick else 32).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tx, ty, vx, vy = tx.to(device), ty.to(device), cas.to_float(vx).to(device), vy.to(device)
    for i in range(iters):
        idx = torch.randint(0, n_train, (128,), device=device)
        x, y = cas.to_float(tx[idx]), ty[idx]
        model.eval()
        xa = attacks.ATTACKS["linf"](model, x, y, steps=3)
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xa), y).backward()
        opt.step()
    model.eval()
    rows = {}
    for name in ("linf", "l2", "fog", "ppgd"):
        acc = []
        for bf16 in (False, True):
            torch.manual_seed(0)
            xa = torch.cat([attacks.ATTACKS[name](cas.attack_model(model, bf16), xb, yb, steps=10)
                            for xb, yb in zip(vx.split(250), vy.split(250))])
            with torch.no_grad():
                acc.append(100 * (model(xa).argmax(1) == vy).float().mean().item())
        rows[name] = acc
    with torch.no_grad():
        clean = 100 * (model(vx).argmax(1) == vy).float().mean().item()
    return clean, rows, n_test


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes (for a CPU: tests the check itself)")
    p.add_argument("--out", type=str, default="", help="also write the results as JSON here")
    args = p.parse_args(argv)
    device, t_all, table, res = torch.device(args.device), time.time(), [], {}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name} | torch {torch.__version__} | {'quick' if args.quick else 'full'}", flush=True)

    model = cas.build_model(10, (0.5,) * 3, (0.25,) * 3, 8 if args.quick else 64).to(device).eval()
    for bf16 in (False, True):
        t0 = time.time()
        bad = res[f"contract_bf16_{bf16}"] = contract(model, device, bf16)
        table.append(("contract", f"{len(attacks.ATTACKS)} attacks, {'bf16' if bf16 else 'fp32'} forward",
                      not bad, "; ".join(f"{k}: {', '.join(v)}" for k, v in bad.items()) or "all hold",
                      time.time() - t0))
        print(table[-1], flush=True)
    for name, ok, sec, last in scripts(args.device, args.quick):
        table.append(("scripts", name, ok, last, sec))
        print(table[-1], flush=True)
    t0 = time.time()
    clean, rows, n = bf16_vs_fp32(device, args.quick)
    res["bf16"] = {"clean": clean, "rows": rows, "n": n}
    worst = max(abs(a - b) for a, b in rows.values())
    table.append(("bf16", f"robust acc fp32 vs bf16 ({n} images)", worst <= 3.0,
                  f"clean {clean:.1f}; " + ", ".join(f"{k} {a:.1f}/{b:.1f}" for k, (a, b) in rows.items()),
                  time.time() - t0))
    print(table[-1], flush=True)
    t0 = time.time()
    width, bs = ("8", "16") if args.quick else ("64", "128")
    b = res["bench"] = bench.main(["--device", args.device, "--width", width, "--batch-size", bs, "--iters",
                                   "3" if args.quick else "10", "--samplers", "cas,sat,avg"])
    ms, slow = b["ms_per_iter"], {k: v for k, v in b["step_vs_linf"].items() if v > (4.0 if k == "ppgd" else 1.25)}
    # 10 epochs of fine-tuning on the 21 arms (SAT's pi ~ w; CAS costs the same per iteration): SAT's l_p iteration
    # with its mean l_p attack step replaced by the w-weighted mean step over all arms
    w = dict(zip(attacks.ALL, cas.scenario_weights(list(attacks.ALL), "cifar")))
    step_all = sum(w[k] * b["ms_per_step"][k] for k in w) / sum(w.values())
    step_lp = sum(b["ms_per_step"][k] for k in LP) / len(LP)
    it21 = ms["sat"] + b["attack_steps"] * (step_all - step_lp)
    table += [("bench", f"ms / iteration, width {width}, batch {bs}", ms["cas"] / ms["sat"] <= 1.005,
               f"CAS {ms['cas']:.1f}, SAT {ms['sat']:.1f}, AVG {ms['avg']:.1f}; CAS/SAT {ms['cas'] / ms['sat']:.3f}",
               time.time() - t0),
              ("bench", "iteration / model passes (<= 1.15)", max(b["fraction"].values()) <= 1.15,
               ", ".join(f"{k} {v:.3f}" for k, v in b["fraction"].items()), 0.0),
              ("bench", "attack step / linf step (<= 1.25, ppgd <= 4)", not slow,
               ", ".join(f"{k} {v:.2f}" for k, v in slow.items()) or "all within", 0.0),
              ("bench", "10 CAS epochs, 21 arms, paper scale (paper 2408 s)", True,
               f"about {it21 * 3910 / 1e3:.0f} s = 3910 iterations x {it21:.1f} ms", 0.0)]

    print(f"\n{'section':9s} {'check':44s} {'ok':4s} {'s':>6s}  detail")
    for sec, what, ok, detail, s in table:
        print(f"{sec:9s} {what:44s} {'ok' if ok else 'FAIL':4s} {s:6.1f}  {detail[:100]}")
    print(f"total {time.time() - t_all:.0f} s; {sum(not r[2] for r in table)} of {len(table)} checks failed")
    if args.out:
        Path(args.out).write_text(json.dumps({"table": table, **res}, indent=2, default=str))
    return 0 if all(r[2] for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
