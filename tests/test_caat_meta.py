"""caat_meta.py: the meta step (Eqs. 27-28), the characteristics (Eqs. 20-24) and bound (Eq. 26) by hand, the data
scenarios, every --method / ablation run as a user runs it, exact resume, and clear errors for bad inputs."""

import json
import math
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import torch
import torch.nn.functional as F

import caat_meta as cm

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--dataset", "fake", "--device", "cpu", "--width", "8", "--epochs", "1", "--max-steps", "2",
         "--attack-steps", "1", "--eval-examples", "8"]
FAST = ["--batch-size", "32", "--meta-batch-size", "16", "--eval-pgd-steps", "1,2", "--val-attack-steps", "1"]


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
        loss = cm.meta_step(model, wnet, wopt, zeta, x, x_adv, x_anti, y, w, w, xm, ym, xm_adv, lr=0.1, lam=1.5)
        self.assertTrue(torch.isfinite(loss))
        self.assertTrue(any(not torch.equal(a, b) for a, b in zip(omega0, wnet.parameters())), "Omega unchanged")
        for k, v in model.named_buffers():
            self.assertTrue(torch.equal(v, buffers0[k]), f"buffer {k} changed by the virtual step")
        for k, v in model.named_parameters():
            self.assertTrue(torch.equal(v, params0[k]), f"W changed by the virtual step: {k}")
            self.assertIsNone(v.grad, f"{k} got a .grad")
        model(x)   # a real train-mode forward does move the running stats (the check above is not vacuous)
        self.assertFalse(torch.equal(model.bn.running_mean, buffers0["bn.running_mean"]))

    def test_weighting_net_tau_softmax(self):
        wnet = cm.WeightingNet(hidden=8, tau=0.1)
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
        self.assertGreater(fair.class_eps(8 / 255)[0].item(), 8 / 255)
        self.assertAlmostEqual(fair.class_eps(8 / 255)[1].item(), 0.98 * 8 / 255, places=7)


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

    def test_every_baseline_method(self):
        """Each baseline as a user runs it (subprocess): adversaries only, the right FRL machinery active."""
        for method in cm.METHODS[1:]:
            with self.subTest(method=method):
                out = self.tmp / method
                run_script(*SMOKE, *FAST, "--method", method, "--out-dir", out)
                res = json.loads((out / "results.json").read_text())
                self.assertEqual((res["method"], res["steps"]), (method, 2))
                rec = read_log(out / "log.jsonl")[-1]
                self.assertEqual(rec["caat/adv_ratio"], 1.0)
                self.assertEqual("val/nat_err_avg" in rec, method.startswith(("frl", "baseline")))
                remargin = method in ("frl-remargin", "frl-both")
                self.assertEqual(any(abs(e - 8) > 1e-4 for e in rec["frl/eps_class"]), remargin)

    def test_ablations_and_scenarios(self):
        """Sec. 6.5 settings, --drop-characteristic, ReMargin bound, noisy and long-tailed data (in-process)."""
        runs = [["--setting", s] for s in ("I", "II", "III", "without")] + [
            ["--drop-characteristic", "2,5", "--bound", "remargin", "--no-fairness"],
            ["--scenario", "noisy", "--noise", "pairflip", "--noise-rate", "0.4"],
            ["--scenario", "longtail", "--imbalance", "2"]]
        for extra in runs:
            with self.subTest(extra=extra):
                out = self.tmp / "_".join(extra).replace("-", "")
                res = cm.main(cm.get_args([*SMOKE, *FAST, *extra, "--out-dir", str(out)]))
                self.assertEqual(res["steps"], 2)
                rec = read_log(out / "log.jsonl")[-1]
                derived = json.loads((out / "args.json").read_text())["derived"]
                counts = torch.tensor(derived["class_counts"])
                if extra[1] in ("I", "II"):
                    self.assertEqual(rec["caat/adv_ratio"], 1.0)   # adversaries only
                if extra[1] in ("I", "III"):
                    self.assertTrue(all(abs(b - 8) < 1e-4 for b in rec["caat/bound_class"] if b), rec["caat/bound_class"])
                if extra[1] == "without":   # the larger half of the classes is head (anti), the rest tail (adv)
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


class TestBadInputs(unittest.TestCase):
    def test_clear_errors(self):
        cases = [(["--noise-rate", "1.5"], "--noise-rate"), (["--drop-characteristic", "7"], "--drop-characteristic"),
                 (["--method", "trades", "--setting", "II"], "Meta-CAAT ablations"),
                 (["--eps", "0"], "--eps"), (["--imbalance", "0.5"], "--imbalance"),
                 (["--attacks", "fog"], "l_inf"), (["--eval-pgd-steps", "10,x"], "--eval-pgd-steps")]
        for argv, msg in cases:
            with self.subTest(argv=argv), self.assertRaisesRegex(ValueError, msg):
                cm.check_args(cm.make_parser().parse_args(SMOKE + argv))
        proc = run_script(*SMOKE, "--meta-per-class", "1000", "--out-dir", Path(tempfile.mkdtemp()) / "x", expect=1)
        self.assertIn("--meta-per-class 1000", proc.stderr)
        proc = run_script("--resume", "/nonexistent/ckpt.pt", expect=2)   # a user error: one line, exit 2
        self.assertIn("checkpoint not found", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
    unittest.main()
