"""No host syncs in the per-step loops of the attacks (fast on a GPU), checked on CPU.

A host sync is an op that makes the CPU wait for the GPU: reading a value (.item(), bool(), int(), float(),
`if t.any():`), an op whose output SHAPE depends on the data (nonzero, boolean-mask indexing, masked_select, unique,
repeat_interleave without output_size, bincount), and a tensor built from Python data (`torch.tensor([...],
device=cuda)`, a blocking host->device copy: PyTorch synchronises the stream after a non-blocking=False copy).
No GPU is needed to find them: a TorchDispatchMode sees every aten op on CPU too, so `SyncCounter` counts the calls
of those ops. Each attack runs on a tiny conv net and 4 images with steps = K and steps = 2K; the difference divided
by K is its number of syncs per step, which must be 0 (documented exceptions: ALLOWED_PER_STEP). The per-call count
(steps = K minus K times the per-step count) is printed by `python -m tests.test_syncs` (a table, not a test).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_syncs.py
"""

import collections
import unittest

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import attacks
from attacks._common import check_inputs, kth_smallest
from attacks.autoattack import autoattack, run_component

# ops that read a value or produce a data-dependent shape: a device->host sync on CUDA
SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_numpy", "argwhere", "masked_select", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount", "equal", "is_nonzero",
            "allclose", "_linalg_check_errors"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"}
H2D_OPS = {"lift_fresh", "lift_fresh_copy"}   # torch.tensor(python data): a blocking host->device copy on CUDA

K = 2   # steps of the short run; the long run has 2K

# Documented exceptions: at most this many syncs per step (reason in the module named)
ALLOWED_PER_STEP = {
    # attacks/perceptual.py (ppgd's loop): the data-dependent loop exits, as upstream's. A step's first read asks both
    # whether any point is still outside the budget after the projection's first Newton iteration and whether CG goes
    # on after its first iteration; each further CG iteration but the last adds one (at most cg_iters - 2 = 3).
    # Without them every step would run all CG iterations, all NEWTON_ITERS Newton iterations and the bisection on the
    # whole batch. (A second Newton iteration adds one more per iteration; rare, and not the case here.)
    "ppgd": 4,
    # attacks/_square.py: Square queries only the points not yet broken (a data-dependent sub-batch, as AutoAttack);
    # one nonzero per query, which also ends the search when every point is broken.
    "square": 1,
}


class SyncCounter(TorchDispatchMode):
    """Counts the aten calls that would make the host wait for the device on CUDA, by category."""

    # Tensor methods that read device data without an aten op the mode could see on CPU (on CUDA they copy to host)
    READS = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self._saved = {}

    def __enter__(self):
        for name in self.READS:
            self._saved[name] = method = getattr(torch.Tensor, name)

            def counted(t, *args, _name=name, _method=method, **kwargs):
                self.counts[f"{_name}()"] += 1
                return _method(t, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.counts[name] += 1
        elif name in H2D_OPS and args[0].dim() > 0:
            # torch.tensor(data): a host->device copy on CUDA. 0-d ones are left out: `t[i] = 2.0` lifts its scalar
            # too, and that one is a fill on CUDA (a 0-d torch.tensor(v, device=cuda) in a loop goes unseen)
            self.counts["tensor(data)"] += 1
        elif name in INDEX_OPS and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())):
            self.counts[f"{name}[bool]"] += 1
        elif name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") and \
                kwargs.get("output_size") is None:             # tensor repeats: the output size is data
            self.counts["repeat_interleave"] += 1
        return func(*args, **kwargs)

    @property
    def total(self):
        return sum(self.counts.values())


def count(fn):
    """(total syncs, Counter by op) of one call of fn()."""
    with SyncCounter() as c:
        fn()
    return c.total, c.counts


class TinyNet(nn.Module):
    """conv -> relu -> conv(s2) -> relu -> global pool -> linear: no features(), so ppgd takes its maps by hooks."""

    def __init__(self, num_classes=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        a = F.relu(self.c2(F.relu(self.c1(x - 0.5))))
        return self.fc(a.mean((2, 3)))


def data(model, b=4, hw=16):
    """Random images labelled with the model's prediction (every point is attacked, none starts broken)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(b, 3, hw, hw, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def attack_fn(name, model, x, y):
    """steps -> a call of ATTACKS[name] with that many steps and its default (medium) setting."""
    kw = attacks.attack_settings(name, "train", steps=2 * K)
    kw.pop("steps")
    kw.pop("step_size", None)   # the signature's default: the same for K and 2K steps

    def run(steps):
        torch.manual_seed(0)
        attacks.ATTACKS[name](model, x, y, steps=steps, **kw)
    return run


def component_fn(name, norm, model, x, y):
    todo = torch.ones(x.shape[0], dtype=torch.bool)

    def run(steps):
        run_component(name, model, x, y, todo, norm=norm, eps={"linf": 8 / 255, "l2": 0.5, "l1": 12.0}[norm],
                      n_iter=steps, n_queries=steps)
    return run


def per_step(run):
    """(syncs per step, syncs per call, ops of the 2K-step run) of run(steps), after a warm-up call (constants that
    an attack builds once per device are cached by then)."""
    run(K)
    short, _ = count(lambda: run(K))
    long, ops = count(lambda: run(2 * K))
    step = (long - short) / K
    return step, short - K * step, ops


def checked_attacks():
    return list(attacks.ATTACKS)


class TestSyncs(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.model = TinyNet().eval()
        cls.x, cls.y = data(cls.model)

    def test_counter_sees_syncs(self):
        x = self.x
        self.assertEqual(count(lambda: x.sum().item())[0], 1)
        self.assertEqual(count(lambda: bool((x > 0.5).any()))[0], 1)
        self.assertEqual(count(lambda: x[x > 0.5])[0], 1)
        self.assertEqual(count(lambda: x.clone().__setitem__(x > 0.5, x.clone()[x > 0.5]))[0], 2)
        self.assertEqual(count(lambda: (x > 0.5).nonzero())[0], 1)
        self.assertEqual(count(lambda: torch.tensor([1.0, 2.0], device=x.device))[0], 1)
        self.assertEqual(count(lambda: (x > 0.5).flatten()[:3].tolist())[0], 1)
        self.assertEqual(count(lambda: x.cpu())[0], 1)
        self.assertEqual(count(lambda: torch.where(x > 0.5, x, 0.0).amax(1).sort(1))[0], 0)
        self.assertEqual(count(lambda: x.flatten(1).kthvalue(3, 1))[0], 0)
        reps = torch.tensor([1, 2, 0, 1])
        self.assertEqual(count(lambda: x.repeat_interleave(reps, dim=0))[0], 1)
        self.assertEqual(count(lambda: x.repeat_interleave(reps, dim=0, output_size=4))[0], 0)
        self.assertEqual(count(lambda: x.repeat_interleave(2, dim=0))[0], 0)

    def test_helpers(self):
        """check_inputs reads the device once; kth_smallest is the sort-and-gather threshold without the sort."""
        eps = torch.full((4,), 0.1)
        self.assertEqual(count(lambda: check_inputs(self.x, self.y, eps))[0], 1)
        self.assertEqual(count(lambda: check_inputs(self.x, self.y, 0.1))[0], 1)
        g = torch.Generator().manual_seed(2)
        v = torch.randn(5, 50, generator=g).abs().round(decimals=1)          # with ties
        k = torch.tensor([1, 7, 25, 49, 50])
        self.assertEqual(count(lambda: kth_smallest(v, k))[0], 0)
        self.assertTrue(torch.equal(kth_smallest(v, k), v.sort(1).values.gather(1, k[:, None] - 1)))

    def test_no_syncs_per_step(self):
        for name in checked_attacks():
            with self.subTest(attack=name):
                step, call, ops = per_step(attack_fn(name, self.model, self.x, self.y))
                self.assertLessEqual(step, ALLOWED_PER_STEP.get(name, 0), f"{name}: {step} syncs per step; {ops}")
                self.assertLessEqual(call, 8, f"{name}: {call} syncs per call; {ops}")

    def test_autoattack_components(self):
        for norm in ("linf", "l2", "l1"):
            for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
                with self.subTest(norm=norm, component=name):
                    step, call, ops = per_step(component_fn(name, norm, self.model, self.x, self.y))
                    self.assertLessEqual(step, ALLOWED_PER_STEP.get(name, 0),
                                         f"{name} {norm}: {step} syncs per iteration; {ops}")

    def test_autoattack_runner(self):
        """The whole runner: syncs per call only (components, chunks), none per APGD / FAB iteration."""
        def run(n_iter):
            autoattack(self.model, self.x, self.y, norm="linf", version="apgd", n_iter=n_iter)
        step, call, ops = per_step(run)
        self.assertEqual(step, 0, ops)


def main():
    """Print the per-step and per-call sync counts of every attack (python -m tests.test_syncs)."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, y = data(model)
    rows = [(n, attack_fn(n, model, x, y)) for n in attacks.ATTACKS]
    rows += [(f"{c} {nm}", component_fn(c, nm, model, x, y)) for nm in ("linf", "l2", "l1")
             for c in ("apgd-ce", "apgd-t", "fab-t", "square")]
    print(f"{'attack':16s} {'per step':>9s} {'per call':>9s}  ops of the {2 * K}-step call")
    for name, run in rows:
        step, call, ops = per_step(run)
        print(f"{name:16s} {step:9.1f} {call:9.1f}  {dict(ops)}", flush=True)


if __name__ == "__main__":
    main()
