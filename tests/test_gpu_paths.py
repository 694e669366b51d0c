"""The GPU speed paths, exercised on the CPU: --attack-bf16 (AttackModel), --compile, channels_last / fused SGD
(CUDA only: here their CPU no-ops), and the training loops' host-sync-free pieces (no bincount, non-blocking copies).

CPU autocast in bf16 runs the same code path as CUDA's. The --compile runs use torch.compile's "aot_eager" backend
(dynamo + AOTAutograd, where a compiled graph refuses a double backward; inductor's C++ code generation for the same
graphs takes minutes on a 2-core CPU) and are skipped where torch.compile does not work at all.
"""

import argparse
import functools
import json
import shutil
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import caat_meta as cm
import caat_reinforce as cr
import cas
import eval as ev
from attacks import ATTACKS

SCRIPTS = (cas, cm, cr)
FAKE_CPU = ["--dataset", "fake", "--device", "cpu", "--width", "8"]


def trained_model(epochs=3):
    """A width-8 PreActResNet-18 fitted to the fake training images (clean accuracy 1 on the fake test images)."""
    torch.manual_seed(0)
    (tx, ty) = cas.fake_split(cas.FAKE_SIZES[0], 0)
    model = cas.build_model(10, (0.5,) * 3, (0.25,) * 3, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for x, y in cas.iterate_batches(tx, ty, 32, gen):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


class TestAttackModel(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = trained_model()
        vx, cls.y = cas.fake_split(128, 1)
        cls.x = cas.to_float(vx)

    def test_float32_logits_close_to_fp32(self):
        am = cas.AttackModel(self.model)
        with torch.no_grad():
            ref, got = self.model(self.x), am(self.x)
        self.assertEqual(got.dtype, torch.float32)
        self.assertLessEqual((got - ref).abs().max().item(), 0.02 * ref.abs().max().item() + 0.05)
        self.assertGreater((got.argmax(1) == ref.argmax(1)).float().mean().item(), 0.95)
        xr = self.x[:4].clone().requires_grad_(True)   # input gradients come back in fp32
        (g,) = torch.autograd.grad(F.cross_entropy(am(xr), self.y[:4]), xr)
        self.assertEqual(g.dtype, torch.float32)
        self.assertTrue(torch.isfinite(g).all())

    def test_features_pass_through_in_fp32(self):
        am = cas.AttackModel(self.model)
        with torch.no_grad():
            for a, b in zip(am.features(self.x[:4]), self.model.features(self.x[:4])):
                self.assertEqual(a.dtype, torch.float32)
                self.assertTrue(torch.equal(a, b))
        # a model without features(): the forward-hook maps of the model itself, still fp32 (not the bf16 forward)
        seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 10))
        maps = cas.AttackModel(seq).features(self.x[:2])
        self.assertTrue(maps and all(m.dtype == torch.float32 for m in maps))

    def test_mode_is_the_wrapped_models(self):
        model = cas.build_model(10, (0.5,) * 3, (0.25,) * 3, width=8)
        am = cas.AttackModel(model)
        model.eval()
        self.assertFalse(am.training)
        model.train()
        self.assertTrue(am.training)
        am.eval()
        self.assertFalse(model.training)
        self.assertIs(cas.attack_model(model, False), model)
        self.assertIsInstance(cas.attack_model(model, True), cas.AttackModel)
        self.assertEqual(set(am.state_dict()), {"model." + k for k in model.state_dict()})

    def test_attack_under_bf16_close_to_fp32(self):
        """l_inf PGD-5 with the bf16 forward vs fp32: robust accuracy (counted in fp32) within a few points."""
        acc = []
        for bf16 in (False, True):
            torch.manual_seed(0)
            x_adv = ATTACKS["linf"](cas.attack_model(self.model, bf16), self.x, self.y, eps=12 / 255, steps=5)
            self.assertLessEqual((x_adv - self.x).abs().max().item(), 12 / 255 + 1e-6)   # projection still fp32
            with torch.no_grad():
                acc.append((self.model(x_adv).argmax(1) == self.y).float().mean().item())
        self.assertGreater(acc[0], 0.1)   # a non-trivial robust accuracy to compare
        self.assertLess(acc[0], 0.95)
        self.assertLessEqual(abs(acc[0] - acc[1]), 0.05, acc)

    def test_make_arms_wraps_only_with_bf16(self):
        plain = cas.make_arms(["linf"], "train", "fake", 1, {})
        self.assertIsInstance(plain["linf"], functools.partial)
        seen = []
        with mock.patch.dict(cas.ATTACKS, {"linf": lambda m, x, y, **kw: seen.append(m) or x}):
            cas.make_arms(["linf"], "train", "fake", 1, {}, bf16=True)["linf"](self.model, self.x[:2], self.y[:2])
        self.assertIsInstance(seen[0], cas.AttackModel)
        self.assertIs(seen[0].model, self.model)


class TestFlags(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_every_parser_takes_the_flags(self):
        for module in SCRIPTS + (ev,):
            with self.subTest(script=module.__name__):
                p = module.make_parser()
                base = ["--ckpt", "x.pt"] if module is ev else []
                a = p.parse_args(base)
                self.assertEqual((a.attack_bf16, a.compile), (None, False))
                self.assertTrue(p.parse_args(base + ["--attack-bf16"]).attack_bf16)
                self.assertIs(p.parse_args(base + ["--no-attack-bf16"]).attack_bf16, False)
                self.assertTrue(p.parse_args(base + ["--compile"]).compile)

    def test_resolution(self):
        for module in SCRIPTS + (ev,):
            with self.subTest(script=module.__name__):
                ns = module.resolve_speed_flags(argparse.Namespace(attack_bf16=None, compile=False),
                                                torch.device("cpu"))
                self.assertEqual((ns.attack_bf16, ns.compile), (False, False))
                ns = module.resolve_speed_flags(argparse.Namespace(attack_bf16=None), torch.device("cuda"))
                self.assertEqual((ns.attack_bf16, ns.compile), (True, False))   # a run saved before the flags
                ns = module.resolve_speed_flags(argparse.Namespace(attack_bf16=False), torch.device("cuda"))
                self.assertIs(ns.attack_bf16, False)

    def test_args_json_records_the_resolved_values(self):
        cas.main(cas.get_args([*FAKE_CPU, "--epochs", "0", "--pretrain-epochs", "0", "--out-dir",
                               str(self.tmp / "cas")]))
        for module, key in ((cm, "wnet"), (cr, "policy")):   # the CAAT scripts write args.json in start_run
            out = self.tmp / module.SCRIPT
            module.start_run(module.get_args([*FAKE_CPU, "--attack-bf16", "--out-dir", str(out)]), module.SCRIPT, key)
        for name, want in (("cas", False), ("caat_meta", True), ("caat_reinforce", True)):
            a = json.loads((self.tmp / name / "args.json").read_text())
            self.assertEqual((a["attack_bf16"], a["compile"]), (want, False), name)

    def test_eval_with_bf16_attacks(self):
        """evaluate_model's options: the bf16 attacks pass eval.py's sanity checks (ppgd's LPIPS budget in fp32) and
        eval.json records what ran; fp32 by default on the CPU."""
        model = cas.build_model(10, (0.5,) * 3, (0.25,) * 3, width=8)
        kw = dict(dataset="fake", caat_pgd="", n_examples=8, steps=1, batch_size=8, device="cpu")
        res = ev.evaluate_model(model, attacks="linf", **kw)
        self.assertEqual((res["config"]["attack_bf16"], res["config"]["compile"]), (False, False))
        res = ev.evaluate_model(model, attacks="linf,ppgd", autoattack="linf", aa_version="apgd", attack_bf16=True,
                                **kw)
        self.assertIs(res["config"]["attack_bf16"], True)
        self.assertEqual(set(res["attacks"]), {"linf", "ppgd"})
        self.assertIn("linf", res["autoattack"])


class HostReads(TorchDispatchMode):
    """The aten ops that read device data back to the host (a sync on CUDA), seen on CPU too."""
    OPS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique2", "equal", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class TestHotLoopPieces(unittest.TestCase):
    def test_caat_bookkeeping_reads_nothing_back(self):
        """The CAAT scripts' per-iteration bookkeeping (characteristics, zeta_6 EMA, Eq. 26, the device-side stats)
        makes no host sync (update_class_loss used bincount, which does)."""
        g = torch.Generator().manual_seed(0)
        logits, y = torch.randn(64, 10, generator=g), torch.randint(0, 10, (64,), generator=g)
        counts, cl = torch.bincount(y, minlength=10), torch.full((10,), 2.3)
        stats = cm.DirectionStats(10, torch.device("cpu"))
        # F.one_hot checks the class range with two reads on the CPU only (CUDA relies on device asserts): stand-in
        one_hot = lambda t, c: (t[:, None] == torch.arange(c)).long()   # noqa: E731
        with mock.patch.object(F, "one_hot", one_hot), HostReads() as reads:
            for module in (cm, cr):
                raw = module.raw_characteristics(logits, y, counts, cl)
                module.scale_characteristics(raw, 10)
                module.update_class_loss(cl, raw[:, 0], y)
            stats.add(y, y > 4, torch.rand(64), torch.full((64,), 8 / 255), raw[:, 1], raw[:, 0].mean())
            cm.grad_bound(torch.rand(64), torch.rand(64), torch.rand(64), torch.rand(64), 8 / 255)
        self.assertEqual(reads.seen, [])

    def test_update_class_loss_without_bincount(self):
        """Bitwise what the bincount formula gave (counts exact in float32)."""
        g = torch.Generator().manual_seed(0)
        y, losses, cl = torch.randint(0, 10, (128,), generator=g), torch.rand(128, generator=g), torch.rand(10)
        n = torch.bincount(y, minlength=10).to(cl.dtype)
        total = torch.zeros_like(cl).index_add_(0, y, losses)
        old = torch.where(n > 0, 0.99 * cl + 0.01 * total / n.clamp_min(1), cl)
        for module in (cm, cr):
            self.assertTrue(torch.equal(module.update_class_loss(cl, losses, y), old))

    def test_reinforce_draws_are_multinomials(self):
        """caat_reinforce draws s_i ~ p(s | zeta_i) as torch.multinomial's algorithm does (which reads the
        probabilities back twice per call): the same actions from the same RNG state."""
        torch.manual_seed(0)
        model = cr.build_model(10, (0.5,) * 3, (0.25,) * 3, width=4)
        policy = cr.StrategyNet(hidden=8)
        nn.init.normal_(policy.net[2].weight)   # a non-uniform policy
        x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
        ctx = lambda: {"class_counts": torch.ones(10), "class_loss": torch.full((10,), 2.3),   # noqa: E731
                       "signed_bounds": torch.tensor(cr.SIGNED_BOUNDS_255, dtype=torch.float32),
                       "w_nat": torch.full((10,), 0.1), "w_bdy": torch.full((10,), 0.1)}
        args = cr.get_args([*FAKE_CPU, "--attack-steps", "1"])
        for seed in (1, 2):   # (the training step moves the BN statistics: zeta anew each time)
            with torch.no_grad():
                raw = cr.raw_characteristics(model.eval()(x), y, ctx()["class_counts"], ctx()["class_loss"])
                probs = F.softmax(policy(cr.scale_characteristics(raw, 10)), 1)
            torch.manual_seed(seed)
            want = torch.multinomial(probs, 1).squeeze(1)
            torch.manual_seed(seed)
            got = cr.train_step(model, policy, torch.optim.SGD(model.parameters(), lr=0.0), x, y, ctx(), args)
            self.assertTrue(torch.equal(got["actions"], want))

    def test_batches_and_copies(self):
        self.assertEqual([cas.num_batches(n, 96, d) for n in (256, 64, 192) for d in (False, True)],
                         [3, 2, 1, 1, 2, 2])
        x_u8, y = cas.fake_split(100, 0)
        sizes = lambda **kw: [len(b) for _, b in cas.iterate_batches(x_u8, y, 32, **kw)]   # noqa: E731
        self.assertEqual(sizes(), [32, 32, 32, 4])
        self.assertEqual(sizes(drop_last=True), [32, 32, 32])
        t = torch.arange(3)
        self.assertIs(cas.to_device(t, torch.device("cpu")), t)   # CPU: no copy, no pinning
        # augmentation still draws on the CPU generator: the same generator state gives the same batch
        xb = cas.to_float(x_u8[:8])
        a = cas.augment_batch(xb, torch.Generator().manual_seed(3), "crop_flip")
        self.assertTrue(torch.equal(a, cas.augment_batch(xb, torch.Generator().manual_seed(3), "crop_flip")))

    def test_cpu_keeps_layout_and_optimizer(self):
        model = cas.place_model(cas.build_model(10, (0.5,) * 3, (0.25,) * 3, width=8), torch.device("cpu"))
        self.assertTrue(model.conv1.weight.is_contiguous())   # channels_last only on CUDA
        for module in SCRIPTS:
            opt = module.make_sgd(model.parameters(), torch.device("cpu"), 0.1, 0.9, 5e-4)
            self.assertIsNone(opt.defaults["fused"])          # fused only on CUDA
            self.assertEqual((opt.defaults["momentum"], opt.defaults["weight_decay"]), (0.9, 5e-4))


def compile_works():
    try:
        f = torch.compile(lambda t: t * 2, backend="aot_eager")
        return bool((f(torch.ones(2)) == 2).all()), ""
    except Exception as e:   # noqa: BLE001 -- any failure means: not usable here
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


COMPILE_OK, COMPILE_WHY = compile_works()


@pytest.mark.slow
@unittest.skipUnless(COMPILE_OK, f"torch.compile does not work on this machine ({COMPILE_WHY})")
class TestCompile(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())
        torch._dynamo.reset()
        patched = functools.partial(torch.compile, backend="aot_eager")
        self.patch = mock.patch.object(torch, "compile", patched)
        self.patch.start()

    def tearDown(self):
        self.patch.stop()
        torch._dynamo.reset()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_cas_compiled(self):
        """--compile: full batches only (256 images, batch 96: 2 steps, not 3), plain state_dicts in model.pt."""
        out = self.tmp / "cas"
        res = cas.main(cas.get_args([*FAKE_CPU, "--compile", "--attack-bf16", "--pretrain-epochs", "0", "--epochs", "1",
                                     "--batch-size", "96", "--attack-steps", "1", "--eval-attack-steps", "1",
                                     "--eval-examples", "8", "--attacks", "linf", "--out-dir", str(out)]))
        self.assertEqual(res["steps"], 2)
        a = json.loads((out / "args.json").read_text())
        self.assertEqual((a["compile"], a["attack_bf16"]), (True, True))
        ev.build_model_from_ckpt(out / "model.pt")   # loads strictly: no "_orig_mod." keys

    def test_eval_compiled(self):
        """evaluate_model(compile=True): the same clean predictions; the attacks (bf16 too) run on the compiled
        forward, the last partial batch and AutoAttack's shrinking batches included."""
        model = trained_model(epochs=1)
        kw = dict(dataset="fake", attacks="linf", autoattack="linf", aa_version="apgd", caat_pgd="", n_examples=12,
                  steps=1, batch_size=8, device="cpu", attack_bf16=True)
        want, got = ev.evaluate_model(model, **kw), ev.evaluate_model(model, compile=True, **kw)
        self.assertEqual(got["clean_correct"], want["clean_correct"])
        self.assertEqual((got["config"]["compile"], got["config"]["attack_bf16"]), (True, True))
        self.assertEqual(set(got["autoattack"]), {"linf"})

    def test_caat_meta_meta_step_uncompiled(self):
        """Meta-CAAT with --compile: the meta step's functional_call gets the module itself (a compiled graph refuses
        its double backward), everything else the compiled forward."""
        from torch._dynamo.eval_frame import OptimizedModule
        called = []

        def spy(module, *a, **kw):
            called.append(isinstance(module, OptimizedModule))
            return torch.func.functional_call(module, *a, **kw)

        out = self.tmp / "caat_meta"
        with mock.patch.object(cm, "functional_call", spy):
            cm.main(cm.get_args([*FAKE_CPU, "--compile", "--epochs", "1", "--max-steps", "2", "--attack-steps", "1",
                                 "--batch-size", "64", "--meta-batch-size", "64", "--eval-examples", "8",
                                 "--eval-pgd-steps", "1", "--val-attack-steps", "1", "--out-dir", str(out)]))
        self.assertTrue(called)
        self.assertFalse(any(called))
        a = json.loads((out / "args.json").read_text())
        self.assertEqual((a["compile"], a["derived"]["steps_per_epoch"]), (True, 3))   # 206 images: 3 full batches
        ev.build_model_from_ckpt(out / "model.pt")


if __name__ == "__main__":
    unittest.main()
