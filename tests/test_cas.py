"""CAS reward and selection math (Eqs. 6, 7, 9, 10) against hand-computed values, plus the baseline samplers."""

import argparse
import math
import os
import tempfile
import unittest

import numpy as np
import torch

import attacks
import cas
from cas import CASSampler, EATSampler, OrderSampler, SATSampler, slope

LN2 = math.log(2.0)

# A scripted run with M = 3 arms, weights w = (1, 2, 1): (arm, observed adversarial loss) in pull order t = 0..5
SCRIPT = [(0, 1.0), (1, 2.0), (0, 0.5), (2, 1.0), (1, 1.0), (0, 0.25)]
W = (1.0, 2.0, 1.0)

# Worked by hand (see README, CAS key equations):
# Eq. (6) R_self: arm 0 logs (0, -ln2, -2ln2) -> slope -ln2 -> +w0 ln2; arm 1 logs (ln2, 0) -> slope -ln2 -> +2 ln2;
#   arm 2 has one pull -> 0.
R_SELF = [LN2, 2 * LN2, 0.0]
# Eq. (7) R_tradeoff: k = 0, pulls at t=2 (0.5) and t=5 (0.25); between them arm 2 (t=3) and arm 1 (t=4), once each
#   -> arms 1 and 2 each get w0 * 1/2 * ln(0.5/0.25) = ln2 / 2.
#   k = 1, pulls at t=1 (2.0) and t=4 (1.0); between them arm 0 (t=2) and arm 2 (t=3)
#   -> arms 0 and 2 each get w1 * 1/2 * ln(2/1) = ln2.      k = 2: one pull -> contributes nothing.
R_TRADE = [LN2, LN2 / 2, LN2 / 2 + LN2]
N_AFTER = [4, 3, 2]   # N_v starts at 1 (Sec. 4.3) plus the pulls


def scripted(**kw):
    s = CASSampler(W, alpha=kw.pop("alpha", 10.0), window=kw.pop("window", 3), **kw)
    for arm, loss in SCRIPT:
        s.update(arm, loss)
    return s


def expected_probs(r, n, w, alpha, ucb=True):
    """Eqs. (9)-(10) evaluated on hand-computed rewards."""
    scores = [(math.exp(alpha * rv) + (math.sqrt(2 * math.log(sum(n)) / nv) if ucb else 0.0)) * wv
              for rv, nv, wv in zip(r, n, w)]
    return [s / sum(scores) for s in scores]


class TestReward(unittest.TestCase):
    def test_slope_matches_least_squares(self):
        rng = np.random.default_rng(0)
        for n in (2, 3, 7, 10):
            v = rng.normal(size=n)
            self.assertAlmostEqual(slope(list(v)), np.polyfit(np.arange(n), v, 1)[0], places=12)
        self.assertEqual(slope([]), 0.0)
        self.assertEqual(slope([3.0]), 0.0)

    def test_self_and_tradeoff_rewards_hand_computed(self):
        r_self, r_trade = scripted().rewards()
        for got, want in zip(r_self, R_SELF):
            self.assertAlmostEqual(got, want, places=12)
        for got, want in zip(r_trade, R_TRADE):
            self.assertAlmostEqual(got, want, places=12)

    def test_window_uses_the_arms_own_last_w_pulls(self):
        s = CASSampler([1.0, 1.0], window=2)
        for loss in (8.0, 1.0, 2.0):   # arm 0 only; window 2 keeps (1, 2): slope +ln2 -> R_self = -ln2
            s.update(0, loss)
        self.assertAlmostEqual(s.rewards()[0][0], -LN2, places=12)

    def test_probabilities_hand_computed(self):
        r = [a + b for a, b in zip(R_SELF, R_TRADE)]
        for alpha in (0.5, 1.0, 10.0):
            for ucb in (True, False):
                with self.subTest(alpha=alpha, ucb=ucb):
                    p = scripted(alpha=alpha, ucb=ucb).probs()
                    want = expected_probs(r, N_AFTER, W, alpha, ucb)
                    self.assertTrue(np.allclose(p, want, rtol=1e-12, atol=0), (p, want))

    def test_no_tradeoff_ablation(self):
        s = scripted(tradeoff=False)
        self.assertEqual(s.rewards()[1], [0.0, 0.0, 0.0])
        self.assertTrue(np.allclose(s.probs(), expected_probs(R_SELF, N_AFTER, W, 10.0), rtol=1e-12))

    def test_fresh_sampler_is_proportional_to_weights(self):
        """Fewer than 2 pulls everywhere: R = 0, equal UCB terms -> pi = w / sum(w)."""
        s = CASSampler([6, 6, 1, 1])
        self.assertTrue(np.allclose(s.probs(), [6 / 14, 6 / 14, 1 / 14, 1 / 14]))
        s.update(2, 1.7)   # one pull: still no slope and no trade-off
        self.assertEqual(s.rewards(), ([0.0] * 4, [0.0] * 4))

    def test_nothing_pulled_in_between_contributes_zero(self):
        s = CASSampler([1.0, 1.0, 1.0])
        s.update(1, 1.0)
        s.update(0, 1.0)
        s.update(0, 0.5)   # arm 0 twice in a row: no arm between its two latest pulls
        self.assertEqual(s.rewards()[1], [0.0, 0.0, 0.0])
        s.update(2, 3.0)
        s.update(0, 0.25)  # now arm 2 was pulled between arm 0's two latest pulls: gets w0 * 1 * ln(0.5/0.25)
        self.assertAlmostEqual(s.rewards()[1][2], LN2, places=12)
        self.assertEqual(s.rewards()[1][1], 0.0)

    def test_huge_alpha_reward_stays_finite(self):
        s = CASSampler([1.0, 1.0], alpha=1e9)
        for loss in (10.0, 1.0, 0.1, 1e-12, 0.0):   # includes a zero loss (floored at 1e-8 before log)
            s.update(0, loss)
        for loss in (0.1, 1.0, 10.0):
            s.update(1, loss)
        p = s.probs()
        self.assertTrue(all(math.isfinite(v) for v in p))
        self.assertAlmostEqual(sum(p), 1.0, places=12)
        self.assertGreater(p[0], 0.999)   # the arm whose loss falls fastest dominates

    def test_bad_weights(self):
        for w in ([], [1.0, 0.0], [1.0, -2.0], [float("nan")]):
            with self.subTest(w=w):
                with self.assertRaisesRegex(ValueError, "weights"):
                    CASSampler(w)


class TestStateAndSampling(unittest.TestCase):
    def test_state_dict_round_trip_through_weights_only_checkpoint(self):
        a = scripted()
        with tempfile.TemporaryDirectory() as d:
            torch.save({"sampler": a.state_dict()}, os.path.join(d, "s.pt"))
            state = torch.load(os.path.join(d, "s.pt"), weights_only=True)["sampler"]
        b = CASSampler(W, alpha=10.0, window=3)
        b.load_state_dict(state)
        self.assertEqual(a.probs(), b.probs())
        self.assertEqual(a.rewards(), b.rewards())
        for _ in range(20):
            arm = a.sample()
            self.assertEqual(arm, b.sample())
            a.update(arm, 1.0 / (arm + 2))
            b.update(arm, 1.0 / (arm + 2))
        self.assertEqual(a.state_dict(), b.state_dict())

    def test_sampling_follows_pi_and_is_seeded(self):
        s1, s2 = CASSampler([1.0, 3.0], seed=7), CASSampler([1.0, 3.0], seed=7)
        draws = [s1.sample() for _ in range(4000)]
        self.assertEqual(draws, [s2.sample() for _ in range(4000)])
        self.assertAlmostEqual(sum(draws) / len(draws), 0.75, delta=0.03)

    def test_sat(self):
        self.assertTrue(np.allclose(SATSampler([6, 1, 1]).probs(), [0.75, 0.125, 0.125]))

    def test_eat_uniform_until_every_arm_seen_then_robust_error(self):
        s = EATSampler([1.0, 1.0, 2.0])
        s.update(0, 1.0, correct=30, total=100)
        s.update(1, 1.0, correct=80, total=100)
        self.assertTrue(np.allclose(s.probs(), [0.25, 0.25, 0.5]))   # arm 2 not seen: pi ~ w
        s.update(2, 1.0, correct=40, total=100)
        q = [0.7 * 1, 0.2 * 1, 0.6 * 2]
        self.assertTrue(np.allclose(s.probs(), [v / sum(q) for v in q]))

    def test_order_cycle_repeats_each_arm_w_times(self):
        s = OrderSampler([3, 1, 2])
        seq = []
        for _ in range(12):
            arm = s.sample()
            seq.append(arm)
            s.update(arm, 1.0)
        self.assertEqual(seq, [0, 1, 2, 0, 2, 0] * 2)


class TestTrainingStep(unittest.TestCase):
    """The fixes of one iteration: the semantic step rule, learnable fake data, E-AT's counter, AVG's order."""

    @staticmethod
    def tiny(seed=0):
        torch.manual_seed(seed)
        return cas.build_model(10, (0.5,) * 3, (0.25,) * 3, width=4)

    def test_semantic_training_step_scales_with_eps_and_never_exceeds_it(self):
        """README D8: step = base_step * (eps / base_eps) * (base_steps / steps), at most eps -- for the medium
        budget and a calibrated one (before: pixel trained with step 6.0 against eps 5, edge 0.12 against 0.1, and a
        calibrated gabor eps 0.0092 kept the step 0.02)."""
        for name in attacks.SEMANTIC:
            base = attacks.attack_settings(name, "eval")
            if "step_size" not in base:
                continue
            for scale in (1.0, 0.3, 1.6):
                with self.subTest(attack=name, scale=scale):
                    kw = attacks.attack_settings(name, "train", eps=base["eps"] * scale, steps=10)
                    self.assertEqual(kw["steps"], min(10, base["steps"]))
                    self.assertLessEqual(kw["step_size"], kw["eps"] * (1 + 1e-12))
                    want = base["step_size"] * scale * base["steps"] / kw["steps"]
                    self.assertAlmostEqual(kw["step_size"], min(want, kw["eps"]), places=12)
        self.assertEqual(attacks.attack_settings("pixel", "train")["step_size"], 5.0)   # was 6.0
        self.assertAlmostEqual(attacks.attack_settings("gabor", "train", eps=0.0092)["step_size"], 0.0092 * 2 / 3)
        self.assertEqual(attacks.attack_settings("fog", "eval"), {"eps": 0.4, "steps": 40, "step_size": 0.05})

    def test_fake_data_is_learnable(self):
        """Both fake splits share the class prototypes, so a few SAT steps lift test accuracy far above chance
        (before, class k had another colour in the test split and accuracy stayed at chance)."""
        args = argparse.Namespace(dataset="fake", input_norm="dataset", train_subset=0, test_subset=0)
        data = cas.make_datasets(args, torch.device("cpu"))
        torch.manual_seed(0)
        model = cas.build_model(10, data["mean"], data["std"], width=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        arms = cas.make_arms(["linf"], "train", "fake", 1, {})
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            for x, y in cas.iterate_batches(data["train_x"], data["train_y"], 32, gen, augment=data["augment"]):
                cas.train_step(model, opt, x, y, arms, [1.0], SATSampler([1.0]), 8 / 9, False)
        acc = cas.evaluate(model, data["test_x"], data["test_y"], {}, 64, 0)["clean"]
        self.assertGreater(acc, 0.4, f"fake test accuracy {acc} after 24 SAT steps (chance 0.1; 0.06 before)")

    def test_eat_counts_eval_mode_correctness_of_the_final_iterate(self):
        model = self.tiny()
        x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
        for _ in range(3):   # train-mode BN statistics differ from the running ones: the two modes disagree
            model(torch.rand(16, 3, 32, 32) * 0.2)
        x_adv = attacks.linf(model.eval(), x, y, steps=1)
        with torch.no_grad():
            want = int((model.eval()(x_adv).argmax(1) == y).sum())
        torch.manual_seed(5)
        arms = {"linf": lambda m, xb, yb: x_adv}
        s = EATSampler([1.0])
        cas.train_step(model.train(), torch.optim.SGD(model.parameters(), lr=0.0), x, y, arms, [1.0], s, 1.0, False)
        self.assertEqual((s.correct, s.seen), ([want], [16]))

    def test_avg_generates_every_arm_before_training(self):
        """Every arm's attack sees the same model: BN running statistics untouched by the step's own forwards."""
        model, seen = self.tiny(), []

        def arm(m, xb, yb):
            seen.append((m.training, m.bn.running_mean.clone()))
            return xb.clone()

        x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
        arms = {"a": arm, "b": arm, "c": arm}
        cas.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, arms, [6.0, 1.0, 1.0], None,
                       8 / 9, False)
        self.assertEqual(len(seen), 3)
        self.assertTrue(all(not training for training, _ in seen))
        self.assertTrue(all(torch.equal(seen[0][1], rm) for _, rm in seen))
        self.assertFalse(torch.equal(seen[0][1], model.bn.running_mean))   # the training forwards came after

    def test_deterministic_flag_warns_instead_of_raising(self):
        """--deterministic must work on CUDA, where grid_sample / interpolate / reflection-pad backward have no
        deterministic kernel: those ops warn (torch's warn_only) instead of raising."""
        try:
            cas.seed_everything(0, True)
            self.assertTrue(torch.are_deterministic_algorithms_enabled())
            self.assertTrue(torch.is_deterministic_algorithms_warn_only_enabled())
        finally:
            torch.use_deterministic_algorithms(False)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = False


if __name__ == "__main__":
    unittest.main()
