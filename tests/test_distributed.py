"""torchrun on CPU with the gloo backend, 2 processes: cas.py and eval.py (README, "Several GPUs").

- the data-parallel pieces in-process (torch.multiprocessing, 2 ranks): the synced gradient is the global batch's;
  after CAS / E-AT / AVG iterations every rank holds the same parameters, buffers and sampler state, and drew the same
  arm sequence;
- `torchrun --nproc_per_node 2 cas.py` (and both CAAT scripts): a run killed mid-way and resumed (2 ranks) ends with
  the same networks and log as an uninterrupted one; resuming with another number of processes is refused; every
  checkpoint checks that the ranks hold the same networks (and sampler);
- one rank failing ends the job with its error (no hang);
- `torchrun --nproc_per_node 2 eval.py` writes the same eval.json (per-image results, AutoAttack included) as one
  process.
Multi-GPU speed-up cannot be measured here (one CPU, gloo): these tests check correctness only.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_distributed.py
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cas  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, kind):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cas.init_distributed("cpu")
    g = torch.Generator().manual_seed(0)
    if kind == "gradient":   # sync_gradients: slices of 3 and 5 of a batch of 8 give the batch's mean gradient
        net = nn.Linear(6, 3)
        with torch.no_grad():
            net.weight.copy_(torch.randn(3, 6, generator=g))
            net.bias.zero_()
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        xs, ys = (x[:3], y[:3]) if rank == 0 else (x[3:], y[3:])
        F.cross_entropy(net(xs), ys).backward()
        cas.sync_gradients(net.parameters(), len(ys) / len(y))
        torch.save({"grad": net.weight.grad.clone()}, Path(out) / f"{kind}{rank}.pt")
        cas.end_distributed()
        return
    torch.manual_seed(0)   # the same initial model on every rank (as cas.py: same seed), then a stream per rank
    model = cas.build_model(10, (0.5,) * 3, (0.25,) * 3, 4)
    torch.manual_seed(rank + 1)
    names = ["linf", "l2", "l1"]
    weights = cas.scenario_weights(names, "cifar")
    arms = cas.make_arms(names, "train", "cifar10", 1, {})
    sampler = cas.make_sampler(kind, weights, argparse.Namespace(alpha=10.0, window=10, tradeoff=True, ucb=True,
                                                                 seed=0))
    opt = cas.make_sgd(model.parameters(), torch.device("cpu"), 0.05, 0.9)
    x, y = torch.rand(10, 3, 32, 32, generator=g), torch.randint(0, 10, (10,), generator=g)   # 5 per rank
    seq = [cas.train_step(model, opt, x, y, arms, weights, sampler, 8 / 9, False)["arm"] for _ in range(6)]
    cas.sync_buffers(model)
    torch.save({"state": model.state_dict(), "sampler": sampler.state_dict() if sampler else None, "arms": seq},
               Path(out) / f"{kind}{rank}.pt")
    cas.end_distributed()


def spawn(kind, out):
    mp.spawn(_worker, args=(2, free_port(), out, kind), nprocs=2, join=True)
    return [torch.load(Path(out) / f"{kind}{r}.pt", weights_only=True) for r in range(2)]


def torchrun(script, *argv, ok=True, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
           *map(str, argv)] if nproc > 1 else [sys.executable, script, *map(str, argv)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


CAAT = {"caat_meta.py": ["--meta-batch-size", "8"], "caat_reinforce.py": ["--policy-interval", "2"]}
CAAT_TINY = ["--dataset", "fake", "--device", "cpu", "--width", "4", "--epochs", "2", "--batch-size", "16",
             "--attack-steps", "1", "--eval-examples", "8", "--eval-pgd-steps", "1", "--val-attack-steps", "1",
             "--train-subset", "160", "--log-every", "3"]
TINY = ["--dataset", "fake", "--device", "cpu", "--width", "4", "--pretrain-epochs", "1", "--epochs", "2",
        "--batch-size", "8", "--train-subset", "40", "--attack-steps", "1", "--eval-attack-steps", "1",
        "--eval-examples", "8", "--attacks", "linf,l2,l1", "--log-every", "2"]


@pytest.mark.slow   # spawns processes: ~25 s
class TestDataParallel(unittest.TestCase):
    def test_synced_gradient_is_the_global_batch_gradient(self):
        with tempfile.TemporaryDirectory() as out:
            r0, r1 = spawn("gradient", out)
        g = torch.Generator().manual_seed(0)
        net = nn.Linear(6, 3)
        with torch.no_grad():
            net.weight.copy_(torch.randn(3, 6, generator=g))
            net.bias.zero_()
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        F.cross_entropy(net(x), y).backward()
        self.assertTrue(torch.equal(r0["grad"], r1["grad"]))
        self.assertTrue(torch.allclose(r0["grad"], net.weight.grad, atol=1e-6))

    def test_ranks_agree_after_training(self):
        for kind in ("cas", "eat", "avg"):
            with self.subTest(sampler=kind), tempfile.TemporaryDirectory() as out:
                r0, r1 = spawn(kind, out)
                for k, v in r0["state"].items():
                    self.assertTrue(torch.equal(v, r1["state"][k]), k)
                self.assertEqual(r0["sampler"], r1["sampler"])   # pulls, loss histories, E-AT's counters
                self.assertEqual(r0["arms"], r1["arms"])


@pytest.mark.slow   # torchrun end-to-end: ~70 s
class TestTorchrun(unittest.TestCase):
    def test_cas_resume_equals_uninterrupted(self):
        with tempfile.TemporaryDirectory() as tmp:
            whole, parts = Path(tmp) / "whole", Path(tmp) / "parts"
            torchrun("cas.py", *TINY, "--out-dir", whole)
            proc = torchrun("cas.py", *TINY, "--out-dir", parts, "--interrupt-at-step", 7, ok=False)
            self.assertNotEqual(proc.returncode, 0)                      # every rank stopped at step 7
            self.assertIn("simulated crash", proc.stdout)
            self.assertEqual(sorted(p.name for p in parts.iterdir() if p.suffix == ".tmp"), [])
            refused = torchrun("cas.py", "--resume", parts, "--device", "cpu", ok=False, nproc=1)
            self.assertIn("the run had 2 process(es), this one 1", refused.stderr)
            torchrun("cas.py", "--resume", parts, "--device", "cpu")
            a, b = (torch.load(d / "model.pt", weights_only=True) for d in (whole, parts))
            for k, v in a["model"].items():
                self.assertTrue(torch.equal(v, b["model"][k]), k)
            logs = [[json.loads(l) for l in (d / "log.jsonl").read_text().splitlines()] for d in (whole, parts)]
            strip = lambda rec: {k: v for k, v in rec.items() if not k.startswith("time/")}   # noqa: E731
            self.assertEqual([strip(r) for r in logs[0]], [strip(r) for r in logs[1]])

    def test_caat_resume_equals_uninterrupted(self):
        """Both CAAT scripts, 2 ranks (every checkpoint also checks that the ranks hold the same networks)."""
        for script, flags in CAAT.items():
            with self.subTest(script=script), tempfile.TemporaryDirectory() as tmp:
                whole, parts = Path(tmp) / "whole", Path(tmp) / "parts"
                torchrun(script, *CAAT_TINY, *flags, "--out-dir", whole)
                proc = torchrun(script, *CAAT_TINY, *flags, "--out-dir", parts, "--interrupt-at-step", 13, ok=False)
                self.assertIn("simulated crash", proc.stdout)
                torchrun(script, "--resume", parts, "--device", "cpu")
                a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (whole, parts))
                nets = ("model", "wnet") if "meta" in script else ("model", "policy")
                for net in nets:
                    for k, v in a[net].items():
                        self.assertTrue(torch.equal(v, b[net][k]), f"{net}.{k}")
                logs = [(d / "log.jsonl").read_text().splitlines() for d in (whole, parts)]
                strip = lambda rec: {k: v for k, v in rec.items() if not k.startswith("time/")}   # noqa: E731
                self.assertEqual([strip(json.loads(r)) for r in logs[0]], [strip(json.loads(r)) for r in logs[1]])

    def test_one_rank_failing_ends_the_job(self):
        """Rank 1 raises while rank 0 waits in a collective: torchrun ends the job with rank 1's error, no hang."""
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "fail.py"
            script.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r}); import cas\n"
                              "rank, size = cas.init_distributed('cpu')\n"
                              "if rank == 1:\n    raise RuntimeError('rank one failed')\n"
                              "cas.all_gather(rank)\n")
            proc = torchrun(str(script), ok=False)
            self.assertNotEqual(proc.returncode, 0)
            self.assertIn("rank one failed", proc.stderr)

    def test_eval_two_ranks_equal_one(self):
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            torchrun("cas.py", *TINY, "--epochs", "0", "--out-dir", run, nproc=1)
            flags = ["--ckpt", run / "model.pt", "--dataset", "fake", "--device", "cpu", "--n-examples", "20",
                     "--batch-size", "6", "--steps", "1", "--attacks", "linf,fog,ppgd", "--caat-pgd", "10",
                     "--autoattack", "linf", "--aa-version", "apgd"]
            torchrun("eval.py", *flags, "--out", Path(tmp) / "one.json", nproc=1)
            torchrun("eval.py", *flags, "--out", Path(tmp) / "two.json")
            one, two = (json.loads((Path(tmp) / f).read_text()) for f in ("one.json", "two.json"))
            for group in ("attacks", "pgd", "autoattack"):
                self.assertTrue(one[group])
                for key, e in one[group].items():
                    for field in ("correct", "acc", "max_pert", "x_min", "x_max"):
                        self.assertEqual(e[field], two[group][key][field], f"{group}/{key}/{field}")
            self.assertEqual(one["clean_correct"], two["clean_correct"])
            self.assertEqual(one["union_acc"], two["union_acc"])


if __name__ == "__main__":
    unittest.main()
