"""caat_reinforce.py: the REINFORCE step (Eqs. 33-35) by hand and on scripted rewards, where the paper's objective
leads ("always adversarial, largest bound") and where the reshaped reward leads, the strategy space and the
per-sample perturbation, the K-batch buffer, a run as a user runs it, exact resume, and clear errors."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import caat_reinforce as cr

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--dataset", "fake", "--device", "cpu", "--width", "8", "--epochs", "1", "--max-steps", "2",
         "--attack-steps", "1", "--eval-examples", "8"]
FAST = ["--eval-pgd-steps", "1", "--val-attack-steps", "1"]
ADV0 = len(cr.BOUNDS_255)   # first adversarial action index


def run_script(*args, expect=0):
    proc = subprocess.run([sys.executable, str(ROOT / "caat_reinforce.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(f"exit {proc.returncode} (expected {expect})\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def read_log(path):
    rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def train_policy(reward_fn, baseline, steps, n=128, seed=0, lr=0.5):
    """Sample strategies and take the script's policy_step on a scripted reward r(zeta, action); -> probs, zeta."""
    torch.manual_seed(seed)
    policy = cr.StrategyNet(hidden=32)
    popt = torch.optim.SGD(policy.parameters(), lr=lr)
    zeta = torch.randn(n, 6)
    for _ in range(steps):
        with torch.no_grad():
            actions = torch.multinomial(F.softmax(policy(zeta), 1), 1).squeeze(1)
        cr.policy_step(policy, popt, zeta, actions, reward_fn(zeta, actions), baseline)
    with torch.no_grad():
        return F.softmax(policy(zeta), 1), zeta


class TestStrategySpace(unittest.TestCase):
    def test_signed_bounds_and_uniform_start(self):
        self.assertEqual(len(cr.SIGNED_BOUNDS_255), 26)
        self.assertEqual(cr.SIGNED_BOUNDS_255[:ADV0], tuple(range(-15, -2)))
        self.assertEqual(cr.SIGNED_BOUNDS_255[ADV0:], tuple(range(3, 16)))
        probs = F.softmax(cr.StrategyNet(hidden=8)(torch.randn(4, 6)), 1)
        torch.testing.assert_close(probs, torch.full((4, 26), 1 / 26))

    def test_policy_step_is_eq_34_by_hand(self):
        """One step from the uniform start: the last-layer bias moves by lr (1/N) sum_i A_i (onehot(s_i) - 1/26)."""
        torch.manual_seed(0)
        zeta, actions = torch.randn(4, 6), torch.tensor([0, 13, 25, 13])
        r = torch.tensor([-1.0, 2.0, 4.0, 3.0])   # anti (-L1), then adversaries (+L0)
        for baseline, a in (("none", r), ("mean", r - r.mean()),
                            ("direction-mean", torch.tensor([0.0, -1.0, 1.0, 0.0]))):
            with self.subTest(baseline=baseline):
                policy = cr.StrategyNet(hidden=8)
                popt = torch.optim.SGD(policy.parameters(), lr=0.1)
                cr.policy_step(policy, popt, zeta, actions, r, baseline)
                want = 0.1 * (a[:, None] * (F.one_hot(actions, 26) - 1 / 26)).mean(0)
                torch.testing.assert_close(policy.net[2].bias.detach(), want)

    def test_perturbation_respects_per_sample_bound_and_direction(self):
        torch.manual_seed(0)
        model = cr.build_model(10, (0.5,) * 3, (0.25,) * 3, width=4).eval()
        x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
        adv = torch.tensor([True, False, True, False])
        eps = torch.tensor([3.0, 5.0, 15.0, 15.0]) / 255
        xt = cr.perturb(model, x, y, model(x).detach(), eps, adv, 5, seed=1)
        linf = (xt - x).flatten(1).abs().amax(1)
        self.assertTrue(bool((linf <= eps + 1e-6).all()), linf)
        self.assertTrue(bool((linf > 0.5 * eps).all()), "the sign steps should reach the bound")
        with torch.no_grad():
            p = F.softmax(model(x), 1)
            kl = F.kl_div(F.log_softmax(model(xt), 1), p, reduction="none").sum(1)
            ce0, ce1 = F.cross_entropy(model(x), y, reduction="none"), F.cross_entropy(model(xt), y, reduction="none")
        self.assertTrue(bool((kl[adv] > 0).all()))
        self.assertTrue(bool((ce1[~adv] < ce0[~adv]).all()), "anti-adversaries must lower the CE")
        self.assertFalse(model.training)

    def test_train_step_rewards_are_l0_and_minus_l1(self):
        torch.manual_seed(0)
        args = cr.get_args(SMOKE)
        model = cr.build_model(10, (0.5,) * 3, (0.25,) * 3, width=4).train()
        policy = cr.StrategyNet(hidden=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
        ctx = {"class_counts": torch.ones(10), "class_loss": torch.full((10,), 2.3),
               "signed_bounds": torch.tensor(cr.SIGNED_BOUNDS_255, dtype=torch.float32),
               "w_nat": torch.full((10,), 0.1), "w_bdy": torch.full((10,), 0.1)}
        w0 = [p.detach().clone() for p in model.parameters()]
        s = cr.train_step(model, policy, opt, x, y, ctx, args)
        self.assertTrue(model.training)
        self.assertTrue(any(not torch.equal(a, b) for a, b in zip(w0, model.parameters())), "W unchanged")
        adv = s["adv"].bool()
        self.assertTrue(bool((s["rewards"][adv] >= 0).all()) and bool((s["rewards"][~adv] <= 0).all()))
        self.assertTrue(torch.equal(adv, s["actions"] >= ADV0))
        torch.testing.assert_close(s["eps"] * 255, torch.tensor(cr.SIGNED_BOUNDS_255).float()[s["actions"]].abs())
        self.assertEqual(s["zeta"].shape, (16, 6))
        self.assertFalse(torch.equal(ctx["class_loss"], torch.full((10,), 2.3)), "zeta_6 EMA not updated")


class TestPolicyGradient(unittest.TestCase):
    def test_scripted_reward_raises_the_rewarded_actions(self):
        """Reward 1 for +7/255 when zeta_2 > 0 and for -5/255 otherwise, 0 else: the policy learns both, per state."""
        a_pos, a_neg = cr.SIGNED_BOUNDS_255.index(7), cr.SIGNED_BOUNDS_255.index(-5)

        def reward(zeta, actions):
            target = torch.where(zeta[:, 1] > 0, a_pos, a_neg)
            return (actions == target).float()

        for baseline in ("mean", "none"):
            with self.subTest(baseline=baseline):
                probs, zeta = train_policy(reward, baseline, steps=150)
                pos = zeta[:, 1] > 0
                p_pos, p_neg = probs[pos, a_pos].mean().item(), probs[~pos, a_neg].mean().item()
                self.assertGreater(p_pos, 0.3, f"P(+7 | zeta_2 > 0) = {p_pos:.3f}, start 1/26")
                self.assertGreater(p_neg, 0.3, f"P(-5 | zeta_2 <= 0) = {p_neg:.3f}, start 1/26")
                self.assertLess(probs[~pos, a_pos].mean().item(), 1 / 26, "wrong state should not gain +7")

    def test_papers_objective_leads_to_largest_adversary_and_reshaped_reward_does_not(self):
        """Toy losses with hard (zeta_1 > 0) and easy samples: L0 = 1 + 2 hard + bound/15 for adversaries,
        L1 = (1 + 2 hard)/2 for anti-adversaries. Eq. (34) (rewards +L0 >= 0, -L1 <= 0), with or without the
        action-independent mean baseline, leads every sample to "adversarial, largest bound"; the per-direction
        baseline (a different objective) keeps anti-adversaries for the easy samples and adversaries for the hard."""
        bounds = torch.tensor(cr.SIGNED_BOUNDS_255).float()

        def reward(zeta, actions):
            hard, b = 2.0 * (zeta[:, 0] > 0), bounds[actions]
            return torch.where(b > 0, 1 + hard + b.abs() / 15, -(1 + hard) / 2)

        for baseline in ("none", "mean"):
            with self.subTest(baseline=baseline):
                probs, zeta = train_policy(reward, baseline, steps=150)
                self.assertGreater(probs[:, ADV0:].sum(1).min().item(), 0.95, "every sample -> adversarial")
                self.assertEqual(probs.mean(0).argmax().item(), cr.SIGNED_BOUNDS_255.index(15))
        probs, zeta = train_policy(reward, "direction-mean", steps=150)
        hard, p_adv = zeta[:, 0] > 0, probs[:, ADV0:].sum(1)
        self.assertGreater(p_adv[hard].mean().item(), 0.8, "direction-mean: hard samples -> adversaries")
        self.assertLess(p_adv[~hard].mean().item(), 0.2, "direction-mean: easy samples -> anti-adversaries")


@pytest.mark.slow
class TestRuns(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="caat_reinforce_test_"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_smoke_run_outputs(self):
        out = self.tmp / "smoke"
        proc = run_script(*SMOKE, "--out-dir", out)
        self.assertIn(f"run directory: {out}", proc.stdout.splitlines()[0])
        for f in ("args.json", "corruption.pt", "log.jsonl", "ckpt.pt", "model.pt", "results.json"):
            self.assertTrue((out / f).is_file(), f)
        (rec,) = read_log(out / "log.jsonl")
        for key in ("train/loss", "caat/adv_ratio", "caat/adv_ratio_class", "caat/bound_class", "caat/bound_hist",
                    "caat/margin_by_bound", "caat/adv_ratio_noisy", "policy/updates", "frl/w_nat", "val/rob_err_avg",
                    "test/nat_err_avg", "test/pgd10/rob_err_worst", "test/pgd20/bdy_err_worst"):
            self.assertIn(key, rec, key)
        self.assertEqual(rec["step"], 2)
        hist = rec["caat/bound_hist"]   # signed buckets -16..16: only -15..-3 and 3..15 can be drawn
        self.assertEqual(sum(hist), 206)   # 256 fake images - 5 x 10 validation, 2 batches of 128
        self.assertEqual(sum(hist[1:14]) + sum(hist[19:32]), 206)
        self.assertTrue(all(3 <= b <= 15 for b in rec["caat/bound_class"]), rec["caat/bound_class"])
        res = json.loads((out / "results.json").read_text())
        self.assertEqual((res["method"], res["steps"], res["eval_examples"]), ("reinforce-caat", 2, 8))
        self.assertTrue(0 <= res["final"]["pgd10/rob_err_avg"] <= 1)
        model = torch.load(out / "model.pt", weights_only=True)
        m = cr.load_weights(cr.build_model(10, model["mean"], model["std"], model["width"]), out / "model.pt").eval()
        self.assertEqual((model["arch"], model["width"]), ("preact_resnet18", 8))
        self.assertFalse(m.training)
        self.assertIn("policy", torch.load(out / "ckpt.pt", weights_only=True))

    def test_reshaped_longtail_sum_flags_run(self):
        out = self.tmp / "reshaped"
        run_script(*SMOKE, *FAST, "--scenario", "longtail", "--imbalance", "5", "--baseline", "direction-mean",
                   "--policy-interval", "1", "--lam-reduction", "sum", "--reweight", "none", "--out-dir", out)
        (rec,) = read_log(out / "log.jsonl")
        self.assertEqual(rec["policy/updates"], rec["step"])   # K = 1: an Omega step after every W step
        counts = json.loads((out / "args.json").read_text())["derived"]["class_counts"]
        self.assertGreater(counts[0], counts[-1])
        self.assertNotIn("val/rob_err_avg", rec)
        self.assertEqual(json.loads((out / "results.json").read_text())["method"], "reinforce-caat/direction-mean")

    def test_policy_step_uses_all_k_batches(self):
        """K = 3 over 2 epochs of 4 batches (64, 64, 64, 14 images): Alg. 2, line 6 puts the Omega steps after batches
        t = 2, 5, 8 ((t + 1) % K = 0), each on the buffered (zeta, action, reward) of every batch since the last."""
        seen = []
        step = cr.policy_step
        cr.policy_step = lambda policy, popt, zeta, *a: seen.append(len(zeta)) or step(policy, popt, zeta, *a)
        try:
            out = self.tmp / "buffer"
            cr.main(cr.get_args([*SMOKE[:-6], "--epochs", "2", "--batch-size", "64", "--attack-steps", "1",
                                 "--eval-examples", "8", *FAST, "--policy-interval", "3", "--out-dir", str(out)]))
        finally:
            cr.policy_step = step
        self.assertEqual(seen, [64 + 64, 64 + 14 + 64, 64 + 64 + 14])

    def test_resume_after_interruption_matches_uninterrupted_run(self):
        # 206 training images, batch 64 -> 4 steps per epoch; the crash after step 6 loses half of epoch 2;
        # K = 2 puts Omega steps before and after the crash
        common = [*SMOKE[:-6], "--epochs", "2", "--batch-size", "64", "--attack-steps", "1", "--eval-examples", "8",
                  *FAST, "--policy-interval", "2", "--scenario", "noisy", "--noise", "pairflip"]
        full, cut = self.tmp / "full", self.tmp / "cut"
        run_script(*common, "--out-dir", full)
        run_script(*common, "--out-dir", cut, "--interrupt-at-step", "6", expect=3)
        self.assertFalse((cut / "results.json").exists())
        run_script("--resume", cut, "--device", "cpu")
        log = read_log(full / "log.jsonl")
        self.assertEqual(log, read_log(cut / "log.jsonl"))
        self.assertEqual([r["policy/updates"] for r in log if r["kind"] == "epoch"], [2, 2])
        self.assertGreater(log[0]["caat/n_noisy"], 0)
        for key in ("model", "policy", "policy_optimizer"):
            a = torch.load(full / "ckpt.pt", weights_only=True)[key]
            b = torch.load(cut / "ckpt.pt", weights_only=True)[key]
            flat_a, flat_b = json.dumps(a, default=str, sort_keys=True), json.dumps(b, default=str, sort_keys=True)
            if key != "policy_optimizer":
                self.assertTrue(all(torch.equal(a[k], b[k]) for k in a), key)
            else:
                self.assertEqual(flat_a.count("tensor"), flat_b.count("tensor"))
                for sa, sb in zip(a["state"].values(), b["state"].values()):
                    self.assertTrue(all(torch.equal(sa[k], sb[k]) for k in sa))


@pytest.mark.slow
class TestBadInputs(unittest.TestCase):
    def test_clear_errors(self):
        cases = [(["--noise-rate", "1.5"], "--noise-rate"), (["--eps", "0"], "--eps"),
                 (["--imbalance", "0.5"], "--imbalance"), (["--attacks", "fog"], "l_inf"),
                 (["--eval-pgd-steps", "10,x"], "--eval-pgd-steps"), (["--policy-interval", "0"], "--policy-interval"),
                 (["--policy-lr", "0"], "--policy-lr"), (["--lam", "-1"], "--lam"), (["--amp"], "--amp")]
        for argv, msg in cases:
            with self.subTest(argv=argv), self.assertRaisesRegex(ValueError, msg):
                cr.check_args(cr.make_parser().parse_args(SMOKE + argv))
        with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):   # argparse: not a number
            cr.get_args(SMOKE + ["--lam", "abc"])
        out = Path(tempfile.mkdtemp()) / "x"
        proc = run_script(*SMOKE, "--meta-per-class", "1000", "--out-dir", out, expect=1)
        self.assertIn("--meta-per-class 1000", proc.stderr)
        self.assertFalse(out.exists())
        proc = run_script("--resume", "/nonexistent/ckpt.pt", expect=2)   # a user error: one line, exit 2
        self.assertIn("checkpoint not found", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
    unittest.main()
