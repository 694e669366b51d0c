"""caat_meta.py: the meta step (Eqs. 27-28) and its gradient by hand, the characteristics (Eqs. 20-24), bound (Eq. 26)
and robust error (Eq. 47) by hand, the data scenarios, every README preset run as a user runs it, exact resume, and
clear errors for bad inputs."""

import json
import math
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import caat_meta as cm

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--dataset", "fake", "--device", "cpu", "--width", "8", "--epochs", "1", "--max-steps", "2",
         "--attack-steps", "1", "--eval-examples", "8"]
FAST = ["--batch-size", "32", "--meta-batch-size", "16", "--eval-pgd-steps", "1,2", "--val-attack-steps", "1"]
ADV = ["--direction", "adversarial"]
PRESETS = {   # the README's preset table: name -> flags (cm.method_name must give the name back)
    "pgd-at": [*ADV, "--bound", "fixed", "--reweight", "none", "--loss", "ce"],
    "trades": [*ADV, "--bound", "fixed", "--reweight", "none", "--lam", "6"],
    "frl-reweight": [*ADV, "--bound", "fixed"], "frl-remargin": [*ADV, "--bound", "remargin", "--reweight", "nat"],
    "frl-both": [*ADV, "--bound", "remargin"], "baseline-reweight": [*ADV, "--bound", "fixed", "--reweight", "rob"]}
SETTINGS = {"I": [*ADV, "--bound", "fixed"], "II": ADV, "III": ["--bound", "fixed"], "IV": [],
            "without": ["--direction", "head-tail", "--bound", "fixed"]}


def run_script(*args, expect=0):
    proc = subprocess.run([sys.executable, str(ROOT / "caat_meta.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(f"exit {proc.returncode} (expected {expect})\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_log(path):
    rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


class TestMetaStep(unittest.TestCase):
    def test_meta_step_updates_omega_and_leaves_bn_stats_alone(self):
        torch.manual_seed(0)
        model = cm.build_model(10, (0.5,) * 3, (0.25,) * 3, width=4).train()
        wnet = cm.WeightingNet(hidden=16, tau=0.1)
        wopt = torch.optim.Adam(wnet.parameters(), lr=1e-3)
        x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
        x_adv, x_anti = (x + 0.03 * torch.randn_like(x)).clamp(0, 1), (x - 0.03 * torch.randn_like(x)).clamp(0, 1)
        xm, ym = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
        xm_adv = (xm + 0.03 * torch.randn_like(xm)).clamp(0, 1)
        zeta = torch.randn(6, 6)
        omega0 = [p.detach().clone() for p in wnet.parameters()]
        buffers0 = {k: v.clone() for k, v in model.named_buffers()}
        params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
        w = torch.full((6,), 0.1)
        loss = cm.meta_step(model, wnet, wopt, zeta, x, x_adv, x_anti, y, w, w, xm, ym, xm_adv, 0.1,
                            cm.get_args(["--dataset", "fake"]))
        self.assertTrue(torch.isfinite(loss))
        self.assertTrue(any(not torch.equal(a, b) for a, b in zip(omega0, wnet.parameters())), "Omega unchanged")
        for k, v in model.named_buffers():
            self.assertTrue(torch.equal(v, buffers0[k]), f"buffer {k} changed by the virtual step")
        for k, v in model.named_parameters():
            self.assertTrue(torch.equal(v, params0[k]), f"W changed by the virtual step: {k}")
            self.assertIsNone(v.grad, f"{k} got a .grad")
        model(x)   # a real train-mode forward does move the running stats (the check above is not vacuous)
        self.assertFalse(torch.equal(model.bn.running_mean, buffers0["bn.running_mean"]))

    def test_meta_gradient_matches_the_hand_formula(self):
        """d L_meta / d b (last-layer bias, alpha logit) = sum_i (dL/dalpha_i - dL/dbeta_i) alpha_i beta_i / tau, where
        dL/dalpha_i, dL/dbeta_i come from an independent look-ahead with alpha, beta as free leaf tensors."""
        torch.manual_seed(1)
        args = cm.get_args(["--dataset", "fake"])
        model = cm.build_model(10, (0.5,) * 3, (0.25,) * 3, width=4).train()
        wnet = cm.WeightingNet(hidden=16, tau=0.3, init_std=0.5)
        x, y = torch.rand(5, 3, 32, 32), torch.randint(0, 10, (5,))
        x_adv, x_anti = (x + 0.03 * torch.randn_like(x)).clamp(0, 1), (x - 0.03 * torch.randn_like(x)).clamp(0, 1)
        xm, ym = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
        xm_adv = (xm + 0.03 * torch.randn_like(xm)).clamp(0, 1)
        zeta, w_nat, w_bdy, lr = torch.randn(5, 6), torch.rand(5) + 0.5, torch.rand(5) + 0.5, 0.5
        wopt = torch.optim.SGD(wnet.parameters(), lr=0.0)   # lr 0: meta_step leaves the gradient, Omega unchanged
        cm.meta_step(model, wnet, wopt, zeta, x, x_adv, x_anti, y, w_nat, w_bdy, xm, ym, xm_adv, lr, args)
        got = wnet.net[2].bias.grad[0]
        with torch.no_grad():
            w = wnet(zeta)
        a, b = w[:, 0].clone().requires_grad_(True), w[:, 1].clone().requires_grad_(True)
        params = dict(model.named_parameters())
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        fwd = lambda p: lambda inp: torch.func.functional_call(model, (p, buffers), (inp,))   # noqa: E731
        t = cm.per_sample_losses(fwd(params), x, x_adv, x_anti, y, "trades")
        loss = ((a * w_nat * t["nat"]).sum() / w_nat.sum() + args.lam * (a * w_bdy * t["bdy"]).sum() / w_bdy.sum()
                + (b * w_nat * t["anti"]).sum() / w_nat.sum())
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        fast = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        m = cm.per_sample_losses(fwd(fast), xm, xm_adv, None, ym, "trades")
        da, db = torch.autograd.grad((m["nat"] + args.lam * m["bdy"]).mean(), [a, b])
        want = ((da - db) * w[:, 0] * w[:, 1] / wnet.tau).sum()
        self.assertGreater(abs(want.item()), 1e-6, "a vacuous check")
        self.assertAlmostEqual(got.item(), want.item(), delta=1e-4 * abs(want.item()) + 1e-8)
        self.assertAlmostEqual(wnet.net[2].bias.grad[1].item(), -want.item(), delta=1e-4 * abs(want.item()) + 1e-8)

    def test_weighting_net_tau_softmax(self):
        wnet = cm.WeightingNet(hidden=8, tau=0.1, init_std=0.0)
        self.assertTrue(torch.allclose(wnet(torch.randn(5, 6)), torch.full((5, 2), 0.5)))
        with torch.no_grad():
            wnet.net[2].bias.copy_(torch.tensor([0.5, 0.0]))   # logit gap 0.5 / tau 0.1 -> alpha = sigmoid(5)
        self.assertAlmostEqual(wnet(torch.zeros(1, 6))[0, 0].item(), 1 / (1 + math.exp(-5)), places=5)


class TestCharacteristicsAndBound(unittest.TestCase):
    def test_characteristics_by_hand(self):
        p = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.5, 0.25]])
        logits, y = p.log(), torch.tensor([0, 0])
        counts, class_loss = torch.tensor([6, 3, 1]), torch.tensor([0.3, 0.9, 1.2])
        z = cm.raw_characteristics(logits, y, counts, class_loss)
        want = torch.tensor([
            [-math.log(0.7), 0.7 - 0.2, math.sqrt(0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2),
             -(0.7 * math.log2(0.7) + 0.2 * math.log2(0.2) + 0.1 * math.log2(0.1)), 0.6, 0.3],
            [math.log(4), 0.25 - 0.5, math.sqrt(0.75 ** 2 + 0.5 ** 2 + 0.25 ** 2), 1.5, 0.6, 0.3]])
        torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-6)
        s = cm.scale_characteristics(z, 3)
        ln3 = math.log(3)
        torch.testing.assert_close(s[1], torch.tensor([math.log(4) / ln3, -0.25, math.sqrt(0.875 / 2),
                                                       1.5 / math.log2(3), math.log(1.8), 0.3 / ln3]),
                                   rtol=1e-5, atol=1e-6)

    def test_class_loss_ema(self):
        ema = cm.update_class_loss(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0]), torch.tensor([0, 0, 2]))
        torch.testing.assert_close(ema, torch.tensor([0.99 * 1 + 0.01 * 1.0, 2.0, 0.99 * 3 + 0.01 * 4.0]))

    def test_grad_bound_by_hand(self):
        eps = 8 / 255
        got = cm.grad_bound(torch.tensor([1.0, 4.0]), torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]),
                            torch.tensor([0.0, 1.0]), eps)
        torch.testing.assert_close(got, torch.tensor([(0.25 + 0.9) * eps, (0.5 + 0.9) * eps]))

    def test_input_grad_norms_match_autograd_per_sample(self):
        torch.manual_seed(0)
        model = cm.build_model(10, (0.5,) * 3, (0.25,) * 3, width=4).eval()
        x, y = torch.rand(3, 3, 32, 32), torch.randint(0, 10, (3,))
        xa = (x + 0.01).clamp(0, 1)
        logits = model(x).detach()
        g_adv, g_anti = cm.input_grad_norms(model, logits, xa, xa, y)
        for i in range(3):   # one sample at a time: the batch-summed version must give the same per-sample norms
            xi = xa[i:i + 1].clone().requires_grad_(True)
            ce = F.cross_entropy(model(xi), y[i:i + 1])
            self.assertAlmostEqual(torch.autograd.grad(ce, xi)[0].norm().item(), g_anti[i].item(), places=5)

    def test_fairness_multipliers(self):
        args = cm.get_args(["--dataset", "fake"])
        fair = cm.Fairness(3, args)
        fair.update(torch.tensor([0.1, 0.2, 0.6]), torch.tensor([0.5, 0.5, 0.9]), 0, ("nat", "bdy", "m"))
        # nat: violation 0.6 - 0.3 - 0.05 = 0.25 for class 2 only -> phi = 0.05 * 0.25
        torch.testing.assert_close(fair.phi["nat"], torch.tensor([0.0, 0.0, 0.0125]))
        w = fair.class_weight("nat")
        self.assertAlmostEqual(w.sum().item(), 1.0, places=6)
        self.assertGreater(w[2].item(), w[0].item())
        # bdy errors 0.4, 0.3, 0.3 -> class 0 violates by 0.4 - 1/3 - 0.05; rate 2 x 0.05
        self.assertAlmostEqual(fair.phi["bdy"][0].item(), 0.1 * (0.4 - 1 / 3 - 0.05), places=6)
        self.assertGreater(cm.remargin_eps(fair, 8 / 255)[0].item(), 8 / 255)
        self.assertAlmostEqual(cm.remargin_eps(fair, 8 / 255)[1].item(), 0.98 * 8 / 255, places=7)

    def test_robust_error_counts_clean_errors_eq_47(self):
        """A model that is wrong on the clean (on-grid) images and right on every perturbed point: Eq. (47) counts the
        clean error as a robust error (delta = 0 is in the ball), so robust error 1 and boundary error 0, not < 0."""
        class GridModel(torch.nn.Module):   # class 0 on the uint8 grid, class 1 off it; zero input gradient
            def forward(self, x):
                off = ((x * 255 - (x * 255).round()).abs().flatten(1).amax(1) > 1e-3).float()
                return torch.stack([1 - off, off], 1) * 10 + 0 * x.sum()

        args = cm.get_args(["--dataset", "fake"])
        x_u8, y = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.tensor([1, 1, 1, 0, 0, 0])
        m = cm.fairness_metrics(GridModel(), x_u8, y, [1], 8 / 255, 2, args)
        torch.testing.assert_close(m["nat_err"], torch.tensor([0.0, 1.0]))
        torch.testing.assert_close(m["pgd1/rob_err"], torch.tensor([1.0, 1.0]))   # PGD alone would say [1, 0]
        self.assertEqual(m["pgd1/bdy_err_worst"], 1.0)
        self.assertGreaterEqual(min(m["pgd1/bdy_err_avg"], 0.0), 0.0)


class TestScenarios(unittest.TestCase):
    def test_pairflip_rate_targets_and_seed(self):
        y = torch.arange(10).repeat(2000)
        noisy, pairs = cm.corrupt_labels(y, "pairflip", 0.2, 10, torch.Generator().manual_seed(3))
        flipped = noisy != y
        self.assertAlmostEqual(flipped.float().mean().item(), 0.2, delta=0.01)
        self.assertFalse((pairs == torch.arange(10)[:, None]).any())
        self.assertTrue(((noisy[flipped] == pairs[y[flipped], 0]) | (noisy[flipped] == pairs[y[flipped], 1])).all())
        again, pairs2 = cm.corrupt_labels(y, "pairflip", 0.2, 10, torch.Generator().manual_seed(3))
        self.assertTrue(torch.equal(noisy, again) and torch.equal(pairs, pairs2))
        other, _ = cm.corrupt_labels(y, "pairflip", 0.2, 10, torch.Generator().manual_seed(4))
        self.assertFalse(torch.equal(noisy, other))

    def test_uniform_rate(self):
        y = torch.arange(10).repeat(2000)
        noisy, _ = cm.corrupt_labels(y, "uniform", 0.4, 10, torch.Generator().manual_seed(0))
        self.assertAlmostEqual((noisy != y).float().mean().item(), 0.4 * 0.9, delta=0.012)   # MW-Net: r (C-1)/C
        counts = torch.bincount(noisy[noisy != y], minlength=10).float()
        self.assertLess((counts.max() / counts.min()).item(), 1.3)   # flips spread over all classes

    def test_longtail_counts_and_meta_split(self):
        y = torch.arange(10).repeat(500)
        idx = cm.longtail_index(y, 10.0, 10, torch.Generator().manual_seed(0))
        want = [int(500 * 0.1 ** (c / 9)) for c in range(10)]
        self.assertEqual(torch.bincount(y[idx], minlength=10).tolist(), want)
        self.assertEqual((want[0], want[-1]), (500, 50))
        meta, rest = cm.split_meta(y, 30, 10)
        self.assertEqual(torch.bincount(y[meta], minlength=10).tolist(), [30] * 10)
        self.assertEqual(len(set(meta.tolist()) & set(rest.tolist())), 0)
        self.assertEqual(len(meta) + len(rest), len(y))
        self.assertTrue((meta >= 4690).all())   # the LAST images of every class (FRL's validation split)


@pytest.mark.slow
class TestEndToEnd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="caat_meta_test_"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_default_smoke_command(self):
        out = self.tmp / "smoke"
        run_script(*SMOKE, "--out-dir", out)
        for f in ("args.json", "log.jsonl", "ckpt.pt", "model.pt", "results.json", "corruption.pt"):
            self.assertTrue((out / f).is_file(), f)
        rec = read_log(out / "log.jsonl")[-1]
        for key in ("test/nat_err_avg", "test/nat_err_worst", "test/pgd10/rob_err_avg", "test/pgd20/rob_err_worst",
                    "test/pgd10/bdy_err_worst", "caat/adv_ratio_class", "caat/bound_class", "caat/adv_ratio_clean",
                    "caat/bound_anti_noisy", "caat/alpha_noisy", "caat/alpha_class", "frl/w_nat", "val/nat_err_avg",
                    "train/loss"):
            self.assertIn(key, rec)
        self.assertEqual(len(rec["caat/adv_ratio_class"]), 10)
        b = [v for v in rec["caat/bound_class"] if v > 0]
        self.assertTrue(all(0.9 * 8 - 1e-4 <= v <= 1.9 * 8 + 1e-4 for v in b), b)   # Eq. (26) range, /255
        res = json.loads((out / "results.json").read_text())
        self.assertEqual((res["method"], res["steps"]), ("meta-caat", 2))
        self.assertTrue(0 <= res["final"]["nat_err_avg"] <= 1)
        model = torch.load(out / "model.pt", weights_only=True)
        self.assertEqual((model["arch"], model["width"], model["num_classes"]), ("preact_resnet18", 8, 10))
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        for key in ("optimizer", "scheduler", "wnet", "wnet_optimizer", "fairness", "class_loss", "rng"):
            self.assertIn(key, ckpt)

    def test_every_baseline_preset(self):
        """Each README preset as a user runs it (subprocess): adversaries only, the right FRL machinery active."""
        for method, flags in PRESETS.items():
            with self.subTest(method=method):
                out = self.tmp / method
                run_script(*SMOKE, *FAST, *flags, "--out-dir", out)
                res = json.loads((out / "results.json").read_text())
                self.assertEqual((res["method"], res["steps"]), (method, 2))
                rec = read_log(out / "log.jsonl")[-1]
                self.assertEqual(rec["caat/adv_ratio"], 1.0)
                self.assertEqual("val/nat_err_avg" in rec, method.startswith(("frl", "baseline")))
                remargin = method in ("frl-remargin", "frl-both")
                self.assertEqual(any(abs(e - 8) > 1e-4 for e in rec["frl/eps_class"]), remargin)

    def test_ablations_and_scenarios(self):
        """Sec. 6.5 settings, --drop-characteristic, ReMargin bound, noisy and long-tailed data (in-process)."""
        runs = [[s, *SETTINGS[s]] for s in ("I", "II", "III", "without")] + [
            ["--drop-characteristic", "2,5", "--bound", "remargin", "--reweight", "none"],
            ["--scenario", "noisy", "--noise", "pairflip", "--noise-rate", "0.4"],
            ["--scenario", "longtail", "--imbalance", "2"]]
        for extra in runs:
            with self.subTest(extra=extra):
                out = self.tmp / "_".join(extra).replace("-", "")
                flags = extra[1:] if extra[0] in SETTINGS else extra
                res = cm.main(cm.get_args([*SMOKE, *FAST, *flags, "--out-dir", str(out)]))
                self.assertEqual(res["steps"], 2)
                rec = read_log(out / "log.jsonl")[-1]
                derived = json.loads((out / "args.json").read_text())["derived"]
                counts = torch.tensor(derived["class_counts"])
                if extra[0] in ("I", "II"):
                    self.assertEqual(rec["caat/adv_ratio"], 1.0)   # adversaries only
                if extra[0] in ("I", "III"):
                    self.assertTrue(all(abs(b - 8) < 1e-4 for b in rec["caat/bound_class"] if b), rec["caat/bound_class"])
                if extra[0] == "without":   # the larger half of the classes is head (anti), the rest tail (adv)
                    head = torch.sort(counts, descending=True, stable=True).indices[:5].tolist()
                    for c, r in enumerate(rec["caat/adv_ratio_class"]):
                        self.assertEqual(r, 0.0 if c in head else 1.0, (c, head))
                if "noisy" in extra:
                    saved = torch.load(out / "corruption.pt", weights_only=True)
                    self.assertAlmostEqual((saved["label_train"] != saved["label_clean"]).float().mean().item(),
                                           derived["noise_realised"], places=6)
                    self.assertGreater(derived["noise_realised"], 0.25)
                    self.assertEqual(rec["caat/n_noisy"] + rec["caat/n_clean"], 64)
                if "longtail" in extra:   # n_c = min(available, floor(n_max 2^(-c/9))), n_max before the tail
                    _, y = cm.fake_split(cm.FAKE_SIZES[0], 0)
                    pre = torch.bincount(y, minlength=10) - 5
                    want = [min(int(pre[c]), int(int(pre.max()) * 0.5 ** (c / 9))) for c in range(10)]
                    self.assertEqual(counts.tolist(), want)

    def test_resume_after_interruption_matches_uninterrupted_run(self):
        # 206 training images, batch 64 -> 4 steps per epoch; the crash after step 6 loses half of epoch 2
        common = [*SMOKE[:-6], "--epochs", "2", "--batch-size", "64", "--meta-batch-size", "16", "--attack-steps", "1",
                  "--eval-examples", "8", "--eval-pgd-steps", "1", "--val-attack-steps", "1",
                  "--scenario", "noisy", "--noise", "pairflip"]
        full, cut = self.tmp / "full", self.tmp / "cut"
        run_script(*common, "--out-dir", full)
        run_script(*common, "--out-dir", cut, "--interrupt-at-step", "6", expect=3)
        self.assertFalse((cut / "results.json").exists())
        run_script("--resume", cut, "--device", "cpu")
        self.assertEqual(read_log(full / "log.jsonl"), read_log(cut / "log.jsonl"))
        a = torch.load(full / "model.pt", weights_only=True)["model"]
        b = torch.load(cut / "model.pt", weights_only=True)["model"]
        for k in a:
            self.assertTrue(torch.equal(a[k], b[k]), k)
        wa = torch.load(full / "ckpt.pt", weights_only=True)["wnet"]
        wb = torch.load(cut / "ckpt.pt", weights_only=True)["wnet"]
        self.assertTrue(all(torch.equal(wa[k], wb[k]) for k in wa))


@pytest.mark.slow
class TestBadInputs(unittest.TestCase):
    def test_clear_errors(self):
        cases = [(["--noise-rate", "1.5"], "--noise-rate"), (["--drop-characteristic", "7"], "--drop-characteristic"),
                 ([*ADV, "--drop-characteristic", "2"], "--drop-characteristic"),
                 (["--eps", "0"], "--eps"), (["--imbalance", "0.5"], "--imbalance"),
                 (["--attacks", "fog"], "l_inf"), (["--eval-pgd-steps", "10,x"], "--eval-pgd-steps")]
        for argv, msg in cases:
            with self.subTest(argv=argv), self.assertRaisesRegex(ValueError, msg):
                cm.check_args(cm.make_parser().parse_args(SMOKE + argv))
        out = Path(tempfile.mkdtemp()) / "x"
        proc = run_script(*SMOKE, "--meta-per-class", "1000", "--out-dir", out, expect=1)
        self.assertIn("--meta-per-class 1000", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertFalse(out.exists(), "a run that fails on its input must not leave a run directory")
        proc = run_script("--resume", "/nonexistent/ckpt.pt", expect=2)   # a user error: one line, exit 2
        self.assertIn("checkpoint not found", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
    unittest.main()
