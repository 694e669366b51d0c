"""Tests for theory.py: the quick audit reproduces every recorded verdict, and the checks can fail.

For several claims the closed form is deliberately perturbed (passed into the check function in place
of the paper's formula); the check must then report an error above its tolerance and a verdict other
than the recorded one -- otherwise the audit could not detect a wrong formula.
"""

import contextlib
import functools
import io
import json
import math
import re
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import theory  # noqa: E402

QUICK = theory.make_grids(quick=True)


@functools.lru_cache(maxsize=None)
def quick_run():
    """One in-process `theory.py --quick --json ...` run, shared by the tests: (exit status, records, stdout)."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as out:
        path = Path(tmp) / "theory.json"
        status = theory.main(["--quick", "--json", str(path)])
        records = json.loads(path.read_text())
    return status, records, out.getvalue()


def scaled(closed_form, factor):
    """A closed form whose class-wise errors are multiplied by `factor` (a deliberately wrong formula)."""
    def wrong(*args, **kwargs):
        return {y: factor * v for y, v in closed_form(*args, **kwargs).items()}
    return wrong


class TestQuickAudit(unittest.TestCase):
    def test_quick_run_reproduces_recorded_verdicts(self):
        status, records, _ = quick_run()
        self.assertEqual(status, 0)
        ids = [r["id"] for r in records]
        self.assertEqual(ids, [i for i, _ in theory.CHECKS])
        for required in ["caat_thm%d" % k for k in range(1, 7)] + ["caat_cor%d" % k for k in range(1, 8)] + [
                "caat_scope", "caat_reg_view", "cas_prop1_quadratic", "cas_prop1_nonquadratic", "cas_ucb",
                "cas_convergence"]:
            self.assertIn(required, ids)
        for r in records:
            with self.subTest(id=r["id"]):
                for key in ("id", "claim", "reading", "closed_form", "numeric", "max_abs_error", "tolerance",
                            "verdict", "note"):
                    self.assertIn(key, r)
                self.assertIn(r["verdict"], theory.VERDICTS)
                self.assertEqual(r["verdict"], r["expected"])
                if r["verdict"] == "HOLDS":
                    self.assertLessEqual(r["max_abs_error"], r["tolerance"])

    def test_console_output_is_short_and_ends_with_the_counts(self):
        _, records, text = quick_run()
        lines = text.splitlines()
        self.assertEqual([ln for ln in lines if len(ln) > 100], [])
        heads = [m.group(1) for m in map(re.compile(r"^\[\w+\] ([A-Z-]+)\b").match, lines) if m]
        self.assertEqual(heads, [r["verdict"] for r in records])  # one headline per claim, in order
        last = re.match(r"^(\d+) hold, (\d+) hold after a fix, (\d+) fail$", lines[-1])
        self.assertIsNotNone(last, lines[-1])
        self.assertEqual([int(n) for n in last.groups()], [heads.count(v) for v in theory.VERDICTS])
        self.assertEqual(sum(int(n) for n in last.groups()), len(heads))

    def test_exit_status_catches_a_changed_verdict(self):
        original = theory.CHECKS
        bad = lambda grids, rng: dict(theory.check_caat_thm2(grids, rng), expected="FAILS")
        theory.CHECKS = [("caat_thm2", bad)]
        try:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                self.assertEqual(theory.main(["--quick"]), 1)
        finally:
            theory.CHECKS = original
        self.assertIn("VERDICT CHANGED for ['caat_thm2']", out.getvalue())
        self.assertEqual(out.getvalue().splitlines()[-1], "1 hold, 0 hold after a fix, 0 fail")


class TestChecksCanFail(unittest.TestCase):
    """A perturbed closed form must be caught (error above tolerance, verdict changes)."""

    def assert_caught(self, rec):
        self.assertGreater(rec["max_abs_error"], rec["tolerance"])
        self.assertNotEqual(rec["verdict"], rec["expected"])

    def test_theorem1_perturbed_eq5(self):
        rng = np.random.default_rng(0)
        self.assertEqual(theory.check_caat_thm1(QUICK, rng)["verdict"], "HOLDS")
        self.assert_caught(theory.check_caat_thm1(QUICK, rng, closed_form=scaled(theory.caat_eq5, 1.01)))

    def test_theorem3_wrong_A(self):
        # a plausible typo: A without the (rho + 1)/2 shift, i.e. Eq. (8)'s A inside Eq. (10)
        def eq10_wrong_A(d, eta, sigma, V, eps, rho):
            return theory.caat_eq10(d, eta + eps * (rho + 1) / 2, sigma, V, eps, rho)
        self.assert_caught(theory.check_caat_thm3(QUICK, np.random.default_rng(0), closed_form=eq10_wrong_A))

    def test_theorem4_sign_flip(self):
        def eq13_swapped(d, eta, sigma, p):
            e = theory.caat_eq13(d, eta, sigma, p)
            return {-1: e[+1], +1: e[-1]}
        self.assert_caught(theory.check_caat_thm4(QUICK, np.random.default_rng(0), closed_form=eq13_swapped))

    def test_regularisation_view_wrong_slope(self):
        wrong = lambda grad_norm_q, sense: sense * grad_norm_q / 2 * 1.05
        self.assert_caught(theory.check_caat_reg_view(QUICK, np.random.default_rng(0), closed_form=wrong))

    def test_prop1_threshold_too_large(self):
        def loose(g_avg, g_q, lam):
            tau, cos_psi = theory.prop1_threshold(g_avg, g_q, lam)
            return 4 * tau, cos_psi
        self.assert_caught(theory.check_cas_prop1_quadratic(QUICK, np.random.default_rng(0), closed_form=loose))

    def test_ucb_bound_too_small(self):
        tight = lambda means, T: 0.05 * theory.ucb1_bound(means, T)
        self.assert_caught(theory.check_cas_ucb(QUICK, np.random.default_rng(0), closed_form=tight))


class TestClosedFormsAgainstHandValues(unittest.TestCase):
    def test_eq8_symmetric_priors(self):
        # V = 1: both classes have error Phi(-sqrt(d) eta / sigma)
        e = theory.caat_eq8(4, 1.0, 1.0, 1.0)
        self.assertAlmostEqual(e[-1], e[+1], places=15)
        self.assertAlmostEqual(e[-1], 0.5 * math.erfc(2.0 / math.sqrt(2)), places=15)

    def test_prop1_one_dimensional_counterexample(self):
        rec = theory.check_cas_prop1_nonquadratic(QUICK, np.random.default_rng(0))
        ce = rec["counterexample_1d"]
        self.assertAlmostEqual(ce["exact_safe"], 6.0, places=8)
        self.assertGreater(ce["tau_star"], 3 * ce["exact_safe"])


if __name__ == "__main__":
    unittest.main()
