"""Lock-in of the CAS bandit with equal importance weights (Eqs. 5-10), on a synthetic loss process.

(a) With equal weights w for all arms, w cancels in Eq. (10) but not inside R (R^self, Eq. 6, and R^tradeoff, Eq. 7,
    are both proportional to the weights), so CASSampler([w]*M, alpha) is exactly CASSampler([1]*M, w * alpha).
(b) Three IDENTICAL synthetic arms, weights (6, 6, 6) and alpha 10: the bandit locks onto one arm, a different one
    for different seeds; with alpha * w small (unit weights or alpha 1) it keeps sampling all three.

    python -m tests.test_lockin --report     # prints the table of (b) (README, CAS lock-in)
"""

import collections
import math
import sys
import unittest

import numpy as np

from cas import CASSampler

# Synthetic loss process, the same for every arm. L_v is arm v's "robust loss"; the pulled arm a reports a minibatch
# estimate of L_a (log-normal noise, relative sd ~SIGMA) measured BEFORE the step, as in CAS; the step then lowers
# L_a by a factor (1 - DOWN) and raises every other arm's loss by (1 + UP) (the cross-attack trade-off).
L0 = 2.0          # initial robust loss of every arm
DOWN = 0.001      # training on an arm lowers its loss by 0.1% per step (x0.67 over 400 steps if always pulled)
UP = 0.0002       # ... and raises each other arm's loss by 0.02% per step
SIGMA = 0.05      # minibatch noise of the observed loss (sd of log); batch 128 of a CE with sd ~1.5 gives ~0.07
T = 400           # iterations, about the 5 epochs x 79 batches of the CPU-scale run
LAST = 200        # the top-arm share is measured over the last LAST iterations
SEEDS = range(20)
LOCKED = 0.9      # a seed "locked in" when one arm took >= 90% of the last LAST pulls

CONFIGS = [  # (label, weights, alpha, process overrides)
    ("w=(6,6,6), alpha=10 (the CPU-scale run)", (6, 6, 6), 10.0, {}),
    ("w=(1,1,1), alpha=60 (same bandit, Eq. 10)", (1, 1, 1), 60.0, {}),
    ("w=(6,6,6), alpha=1 (= unit w, alpha 6)", (6, 6, 6), 1.0, {}),
    ("w=(1,1,1), alpha=10", (1, 1, 1), 10.0, {}),
    ("w=(1,1,1), alpha=1", (1, 1, 1), 1.0, {}),
]
SENSITIVITY = [  # the same bandit as the first row, other synthetic processes
    ("w=(6,6,6), alpha=10, no observation noise", (6, 6, 6), 10.0, {"sigma": 0.0}),
    ("w=(6,6,6), alpha=10, noise sd 0.02", (6, 6, 6), 10.0, {"sigma": 0.02}),
    ("w=(6,6,6), alpha=10, 10x faster process", (6, 6, 6), 10.0, {"down": 0.01, "up": 0.002}),
]


class LossProcess:
    """Seeded synthetic losses of M identical arms (numpy Generator)."""

    def __init__(self, m, seed, down=DOWN, up=UP, sigma=SIGMA):
        self.L = np.full(m, L0)
        self.g = np.random.default_rng(seed)
        self.down, self.up, self.sigma = down, up, sigma

    def observe_and_step(self, arm):
        """The observed (noisy) loss of the pulled arm, then one 'SGD step' on that arm."""
        obs = float(self.L[arm]) * math.exp(self.sigma * self.g.standard_normal())
        factor = np.full(len(self.L), 1.0 + self.up)
        factor[arm] = 1.0 - self.down
        self.L = self.L * factor
        return obs


def simulate(weights, alpha, seed, iters=T, **process):
    """Arms pulled by CASSampler(weights, alpha, seed=seed) on the synthetic process with the same seed."""
    sampler = CASSampler(list(weights), alpha=alpha, seed=seed)
    losses = LossProcess(len(weights), seed, **process)
    arms = []
    for _ in range(iters):
        arm = sampler.sample()
        sampler.update(arm, losses.observe_and_step(arm))
        arms.append(arm)
    return arms


def top_arm(arms, last=LAST):
    """(share of the most-pulled arm, that arm) over the last `last` pulls."""
    counts = np.bincount(arms[-last:], minlength=3)
    return counts.max() / counts.sum(), int(counts.argmax())


def measure(weights, alpha, seeds=SEEDS, **process):
    """Per seed: (top-arm share over the last LAST iterations, top arm)."""
    return [top_arm(simulate(weights, alpha, s, **process)) for s in seeds]


class TestEqualWeightsAreAScaledAlpha(unittest.TestCase):
    """(a): weights (6,6,6), alpha 10 is exactly weights (1,1,1), alpha 60."""

    def run_pair(self, a, b, seed, iters=T):
        """Feed one observation sequence to samplers a and b; each samples with its own (equally seeded) generator."""
        losses = LossProcess(3, seed)
        for t in range(iters):
            pa, pb = a.probs(), b.probs()
            self.assertTrue(np.allclose(pa, pb, rtol=1e-12, atol=1e-12), (t, pa, pb))
            (sa, ta), (sb, tb) = a.rewards(), b.rewards()
            self.assertTrue(np.allclose(sa, 6 * np.array(sb), rtol=1e-12, atol=1e-12), (t, sa, sb))   # Eq. (6)
            self.assertTrue(np.allclose(ta, 6 * np.array(tb), rtol=1e-12, atol=1e-12), (t, ta, tb))   # Eq. (7)
            arm_a, arm_b = a.sample(), b.sample()
            self.assertEqual(arm_a, arm_b, t)
            loss = losses.observe_and_step(arm_a)
            a.update(arm_a, loss)
            b.update(arm_b, loss)
        return a.pulls

    def test_w6_alpha10_equals_w1_alpha60(self):
        for seed in range(3):
            with self.subTest(seed=seed):
                pulls = self.run_pair(CASSampler([6, 6, 6], alpha=10, seed=seed),
                                      CASSampler([1, 1, 1], alpha=60, seed=seed), seed)
                self.assertEqual(sum(pulls), T)

    def test_weights_do_not_cancel_inside_the_reward(self):
        """Control: same alpha, weights 6 vs 1 -> different pi once rewards are non-zero."""
        a, b = CASSampler([6, 6, 6], alpha=10), CASSampler([1, 1, 1], alpha=10)
        losses = LossProcess(3, 0)
        for arm in (0, 1, 2, 0, 1, 2, 0):
            loss = losses.observe_and_step(arm)
            a.update(arm, loss)
            b.update(arm, loss)
        self.assertGreater(max(abs(x - y) for x, y in zip(a.probs(), b.probs())), 1e-3)


class TestLockInWithIdenticalArms(unittest.TestCase):
    """(b): measured on the synthetic process above (thresholds from `--report`, with margin)."""

    @classmethod
    def setUpClass(cls):
        cls.res = {label: measure(w, alpha, **proc) for label, w, alpha, proc in CONFIGS}

    def test_weights_6_alpha_10_locks_onto_an_arbitrary_arm(self):
        res = self.res[CONFIGS[0][0]]
        shares = [s for s, _ in res]
        locked = [arm for s, arm in res if s >= LOCKED]
        self.assertGreater(np.mean(shares), 0.75, shares)          # measured 0.92
        self.assertGreaterEqual(len(locked), 10, shares)           # measured 15 of 20 seeds
        self.assertGreaterEqual(len(set(locked)), 2, locked)       # not one preferred arm (measured 3/6/6)
        self.assertLessEqual(max(collections.Counter(locked).values()), 0.75 * len(locked), locked)

    def test_unit_weights_alpha_60_is_the_same_run(self):
        self.assertEqual(self.res[CONFIGS[0][0]], self.res[CONFIGS[1][0]])

    def test_small_alpha_times_weight_keeps_all_arms(self):
        for label, *_ in CONFIGS[2:]:
            with self.subTest(label):
                shares = [s for s, _ in self.res[label]]
                self.assertLess(np.mean(shares), 0.45, shares)     # measured 0.36-0.37 (1/3 = uniform)
                self.assertLess(max(shares), 0.6, shares)          # measured at most 0.41


def report(configs=CONFIGS + SENSITIVITY):
    """Markdown table of (b), one row per configuration."""
    seeds = list(SEEDS)
    print(f"{len(seeds)} seeds, {T} iterations, 3 identical synthetic arms: L0 = {L0}, pulled arm x(1 - {DOWN}), "
          f"others x(1 + {UP}), observed loss noise sd {SIGMA} (unless stated)")
    print()
    print(f"| configuration | mean top-arm share, last {LAST} its | seeds with share >= {LOCKED} "
          f"| top arm per seed (arm 0 / 1 / 2) |")
    print("|---|---|---|---|")
    for label, w, alpha, proc in configs:
        res = measure(w, alpha, seeds, **proc)
        shares = [s for s, _ in res]
        hist = collections.Counter(arm for _, arm in res)
        n_locked = sum(s >= LOCKED for s in shares)
        print(f"| {label} | {np.mean(shares):.2f} (min {min(shares):.2f}, max {max(shares):.2f}) "
              f"| {n_locked}/{len(seeds)} | {hist[0]} / {hist[1]} / {hist[2]} |")


if __name__ == "__main__":
    if "--report" in sys.argv[1:]:
        report()
    else:
        unittest.main()
