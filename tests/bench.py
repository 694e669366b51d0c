"""Benchmark (not a test): time per training iteration of each sampler, and time per attack step vs linf.

    python -m tests.bench                                   # defaults: the device's model size, l_p arms
    python -m tests.bench --device cpu --width 8 --batch-size 32 --iters 6
    python -m tests.bench --attacks all --samplers cas,sat  # every registered attack as an arm

Prints ratios, which transfer across machines better than seconds: CAS/SAT (target <= 1.005: the bandit must cost
nothing next to the attack), AVG/SAT (about the number of arms), the model-pass fraction of an iteration (its time /
(attack steps x one input-gradient pass + training passes x one forward+backward pass), target <= 1.15: everything
that is not a model pass -- rendering, projections, the bandit, the optimizer -- adds at most 15%), and for every
registered attack the time of one attack step relative to one linf PGD step (the fixed per-call cost, e.g. drawing
random structure, is removed by timing `steps` and 0 steps; target <= 1.25, PPGD <= 4).
`main()` also returns the numbers as a dict (tests/gpu_check.py uses them).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import attacks
import cas


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device, reps):
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Replay:
    """Wraps a sampler: runs its own probs/sample/update, but returns the arm of a fixed sequence."""

    def __init__(self, sampler, seq):
        self.sampler, self.seq, self.i = sampler, seq, 0

    def sample(self):
        self.sampler.sample()
        arm = self.seq[self.i % len(self.seq)]
        self.i += 1
        return arm

    def update(self, arm, loss, correct=0, total=0):
        self.sampler.update(arm, loss, correct, total)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=0, help="0: 64 on cuda, 8 on cpu")
    p.add_argument("--batch-size", type=int, default=0, help="0: 128 on cuda, 32 on cpu")
    p.add_argument("--attacks", type=str, default="linf,l2,l1", help="arms: comma list or 'all' (registered)")
    p.add_argument("--samplers", type=str, default=",".join(cas.SAMPLERS))
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per sampler (after 2 warm-up)")
    p.add_argument("--step-probe", type=int, default=3, help="steps used to time one attack step")
    p.add_argument("--skip-attacks", action="store_true", help="skip the per-attack step timing")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the training passes (cas.py --amp)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (cas.py --compile)")
    p.add_argument("--attack-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 model forward inside the attacks (cas.py --attack-bf16; default: on for CUDA)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    bf16 = device.type == "cuda" if args.attack_bf16 is None else args.attack_bf16
    width = args.width or (64 if device.type == "cuda" else 8)
    bs = args.batch_size or (128 if device.type == "cuda" else 32)
    names = [n for n in attacks.ALL if n in attacks.ATTACKS] if args.attacks == "all" else \
        attacks.registered(args.attacks)
    torch.manual_seed(0)
    model = cas.build_model(10, (0.5,) * 3, (0.25,) * 3, width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = torch.compile(model) if args.compile else model
    x = torch.rand(bs, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (bs,), device=device)
    print(f"device {device} | PreActResNet-18 width {width} | batch {bs} | arms {','.join(names)} | "
          f"{args.attack_steps} attack steps | amp {args.amp} | attack-bf16 {bf16} | compile {args.compile} | "
          f"torch {torch.__version__} | threads {torch.get_num_threads()}")

    weights = cas.scenario_weights(names, "cifar")
    arms = cas.make_arms(names, "train", "cifar10", args.attack_steps, {}, bf16=bf16)
    samplers = args.samplers.split(",")
    # Every single-arm sampler does its real work (probs, sample, update) but the arm actually attacked comes from
    # one common pre-drawn sequence, so the ratios measure the samplers' cost and not a different mix of attacks.
    # Samplers are interleaved round by round, so a change of machine load hits all of them alike.
    seq = [i % len(names) for i in range(args.iters + 2)]
    state = {}
    for sampler_name in samplers:
        ns = argparse.Namespace(sampler=sampler_name, alpha=10.0, window=10, tradeoff=True, ucb=True, seed=0)
        real = cas.make_sampler(sampler_name, weights, ns)
        state[sampler_name] = (None if real is None else Replay(real, seq),
                               cas.make_sgd(model.parameters(), device, 1e-4, 0.9))
    times = {n: [] for n in samplers}
    for r in range(args.iters + 2):
        for sampler_name in samplers[r % len(samplers):] + samplers[:r % len(samplers)]:   # rotate who goes first
            sampler, opt = state[sampler_name]
            t = time_it(lambda: cas.train_step(model, opt, x, y, arms, weights, sampler, 8 / 9, args.amp),
                        device, 1)
            if r >= 2:   # warm-up rounds
                times[sampler_name].append(t)
    per_iter = {n: statistics.median(v) for n, v in times.items()}
    for n in samplers:
        print(f"  {n:6s} {per_iter[n] * 1e3:9.1f} ms / iteration (median of {args.iters})", flush=True)

    # the bandit's own bookkeeping, isolated from the attack cost
    s = cas.CASSampler(weights)
    t = time.perf_counter()
    for i in range(2000):
        arm = s.sample()
        s.update(arm, 1.0 + 0.1 * (i % 7))
    bandit_us = (time.perf_counter() - t) / 2000 * 1e6
    print(f"  CAS bookkeeping (probs + sample + update, {len(names)} arms, W=10): {bandit_us:.0f} us / iteration")
    if "cas" in per_iter and "sat" in per_iter:
        print(f"ratio CAS/SAT = {per_iter['cas'] / per_iter['sat']:.3f} (target <= 1.005); "
              f"bookkeeping / SAT iteration = {bandit_us * 1e-6 / per_iter['sat']:.4f}")
    if "avg" in per_iter and "sat" in per_iter:
        print(f"ratio AVG/SAT = {per_iter['avg'] / per_iter['sat']:.2f} (about the number of arms, {len(names)})")
    t_ig, t_fb = pass_times(model, x, y, device, args.amp, bf16)
    passes = {n: (len(names) * args.attack_steps, len(names) + 1) if n == "avg" else (args.attack_steps, 2)
              for n in per_iter}   # (input-gradient passes, training forward+backward passes) per iteration
    fraction = {n: per_iter[n] / (a * t_ig + b * t_fb) for n, (a, b) in passes.items()}
    print(f"model passes: input-gradient {t_ig * 1e3:.1f} ms, training forward+backward {t_fb * 1e3:.1f} ms; "
          f"iteration / model passes: " + ", ".join(f"{n.upper()} {f:.3f}" for n, f in fraction.items())
          + " (target <= 1.15)")
    out = {"device": str(device), "width": width, "batch": bs, "arms": names, "amp": args.amp, "attack_bf16": bf16,
           "compile": args.compile, "ms_per_iter": {n: v * 1e3 for n, v in per_iter.items()}, "fraction": fraction,
           "ms_input_grad_pass": t_ig * 1e3, "ms_train_pass": t_fb * 1e3, "bandit_us": bandit_us}
    if args.skip_attacks:
        return out
    model.eval()
    k = args.step_probe
    print(f"per-attack time per step relative to one linf step ({k}-step minus 0-step calls, median of 3):")
    cost = {}
    for name in [n for n in attacks.ALL if n in attacks.ATTACKS]:
        fn = attacks.ATTACKS[name]
        m = cas.attack_model(model, bf16)
        t_k = time_it(lambda: fn(m, x, y, steps=k), device, 3)
        t_0 = time_it(lambda: fn(m, x, y, steps=0), device, 3)
        cost[name] = max(t_k - t_0, 1e-9) / k
        print(f"  {name:13s} {cost[name] * 1e3:8.1f} ms/step  {cost[name] / cost['linf']:6.2f}x linf  "
              f"(fixed per call {t_0 * 1e3:.1f} ms)", flush=True)
    return {**out, "step_vs_linf": {n: c / cost["linf"] for n, c in cost.items()},
            "ms_per_step": {n: c * 1e3 for n, c in cost.items()}, "attack_steps": args.attack_steps}


def pass_times(model, x, y, device, amp, bf16, reps=5):
    """Median time of one input-gradient pass (eval mode, as the attacks see the model) and one training
    forward+backward pass (with --amp's autocast)."""
    def input_grad():
        model.eval()
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(cas.attack_model(model, bf16)(xg), y), xg)

    def train_pass():
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
    input_grad(), train_pass()   # warm-up
    return time_it(input_grad, device, reps), time_it(train_pass, device, reps)


if __name__ == "__main__":
    main()
