"""CAS experiments: the calibration of Eq. (11) on a scripted accuracy function, the trade-off matrix (Figs. 3/6) from
ordinary single-attack runs and eval.py --tradeoff, and the seed aggregation of eval.py (Tables 1-2), end to end on
fake data."""

import argparse
import json
import math
import shutil
import tempfile
import unittest

import pytest
import torch

import cas
from tests.test_scripts import FAST, run_script


class TestCalibrationScripted(unittest.TestCase):
    """cas.calibrate against a known accuracy-vs-eps curve: no model, no data, just Eq. (11)."""

    def run_calibrate(self, acc_of_eps, names, rounds=6, lam=0.6, start=None):
        calls = []

        def fake_make_arms(names_, mode, dataset, steps, eps_table):
            self.assertEqual((mode, steps), ("eval", None))      # calibration measures at full evaluation strength
            return {n: eps_table[n] for n in names_}

        def fake_evaluate(model, x, y, arms, batch_size, seed, part=(0, 1), gather=None):
            calls.append(dict(arms))
            return {"attacks": {n: acc_of_eps[n](eps) for n, eps in arms.items()}}

        args = argparse.Namespace(calib_range=(0.2, 0.6), calib_rounds=rounds, calib_lambda=lam, dataset="cifar10",
                                  batch_size=8, seed=0)
        saved = cas.make_arms, cas.evaluate
        cas.make_arms, cas.evaluate = fake_make_arms, fake_evaluate
        try:
            table, report = cas.calibrate(None, None, None, names, args, dict(start or {}))
        finally:
            cas.make_arms, cas.evaluate = saved
        return table, report, calls

    def test_fixed_point_of_eq_11_on_the_original_margin(self):
        """eps_k = (lambda + acc(eps_k)) * eps with eps the ORIGINAL margin: every update starts from eps_0 (a
        compounding rule eps <- (lambda + acc) * eps_current fails this test)."""
        # fog starts too strong (acc 0.14 at eps 0.5), snow too weak (0.71 at its medium eps 4), wood inside
        curves = {"fog": lambda e: math.exp(-4 * e), "snow": lambda e: 1 / (1 + (e / 5) ** 4), "wood": lambda e: 0.4}
        table, report, calls = self.run_calibrate(curves, ["linf", "fog", "snow", "wood"], start={"fog": 0.5})
        self.assertEqual(set(report), {"fog", "snow", "wood"})   # l_p budgets are never calibrated
        self.assertNotIn("linf", table)
        for name, r in report.items():
            eps0 = r["history"][0][0]
            for (eps, acc), (eps_next, _) in zip(r["history"], r["history"][1:]):
                self.assertFalse(0.2 <= acc <= 0.6)                                  # update only outside the range
                self.assertAlmostEqual(eps_next, (0.6 + acc) * eps0, places=12)      # Eq. (11)
            self.assertEqual(table[name], r["history"][-1][0])
        self.assertEqual(report["fog"]["history"][0][0], 0.5)    # starts from the given (original) margin
        self.assertEqual(report["snow"]["history"][0][0], 4.0)   # or the attack's CIFAR-10 medium eps
        self.assertEqual(report["wood"]["rounds"], 0)
        self.assertTrue(report["fog"]["in_range"] and report["snow"]["in_range"])
        self.assertLess(table["fog"], 0.5)                       # too strong: eps shrinks
        self.assertGreater(table["snow"], 4.0)                   # too weak: eps grows
        self.assertEqual(len(calls), sum(r["rounds"] + 1 for r in report.values()))

    def test_bounded_rounds_and_reported_failure(self):
        # accuracy that does not depend on eps can never reach the range: Eq. (11) reaches its fixed point
        # (0.6 + 0.9) * eps_0 after one update (not compounded) and stops there, reported out of range
        table, report, calls = self.run_calibrate({"fog": lambda e: 0.9}, ["fog"], rounds=3, start={"fog": 0.1})
        self.assertFalse(report["fog"]["in_range"])
        self.assertEqual((report["fog"]["rounds"], len(calls)), (1, 2))
        self.assertAlmostEqual(table["fog"], 0.1 * 1.5, places=12)
        # an accuracy that keeps moving: at most --calib-rounds updates
        n = []
        table, report, calls = self.run_calibrate({"fog": lambda e: n.append(e) or 0.9 - 1e-3 * len(n)}, ["fog"],
                                                  rounds=3, start={"fog": 0.1})
        self.assertEqual((report["fog"]["rounds"], len(calls), report["fog"]["in_range"]), (3, 4, False))


@pytest.mark.slow   # end-to-end runs of the scripts (subclasses inherit the mark)
class ExperimentTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="cas_exp_")
        from pathlib import Path
        cls.tmp = Path(cls.tmp)
        cls.pre = cls.tmp / "pre"
        run_script("cas.py", *FAST, "--pretrain-epochs", "1", "--epochs", "0", "--out-dir", cls.pre)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)


class TestTradeoffMatrix(ExperimentTest):
    """Figs. 3/6: rows are ordinary cas.py runs on one attack; eval.py --tradeoff turns their eval.json into the
    matrix of accuracy changes (README: "Trade-off matrix")."""

    names = ["linf", "fog", "hsv"]

    def evaluate(self, ckpt, out, label):
        run_script("eval.py", "--ckpt", ckpt, "--attacks", ",".join(self.names), "--steps", "1", "--n-examples",
                   "16", "--caat-pgd", "", "--out", out, "--label", label)
        return json.loads(out.read_text())

    def test_independent_and_sequential_rows(self):
        root = self.tmp / "tradeoff"
        start = self.evaluate(self.pre / "model.pt", root / "start.json", "start")
        rows, prev = {}, self.pre / "model.pt"
        for chained in (False, True):
            for k in self.names:
                run_dir = root / ("seq" if chained else "ind") / k
                run_script("cas.py", *FAST[:-1], k, "--init-ckpt", prev if chained else self.pre / "model.pt",
                           "--sampler", "sat", "--epochs", "1", "--max-steps", "1", "--out-dir", run_dir)
                rows[chained, k] = self.evaluate(run_dir / "model.pt", run_dir / "eval.json", k)
                prev = run_dir / "model.pt" if chained else prev
            files = [root / "start.json"] + [root / ("seq" if chained else "ind") / k / "eval.json" for k in self.names]
            out = root / f"matrix_{chained}"
            run_script("eval.py", "--tradeoff", *files, *(["--tradeoff-sequential"] if chained else []), "--out", out)
            mat = json.loads(out.with_suffix(".json").read_text())
            self.assertEqual((mat["attacks"], sorted(mat["rows"]), mat["sequential"]),
                             (self.names, sorted(self.names), chained))
            for i, k in enumerate(self.names):
                ref = rows[True, self.names[i - 1]] if chained and i else start
                for j in self.names:
                    want = rows[chained, k]["attacks"][j]["acc"] - ref["attacks"][j]["acc"]
                    self.assertAlmostEqual(mat["rows"][k][j], want, places=12)
            self.assertAlmostEqual(mat["sum"], sum(sum(r.values()) for r in mat["rows"].values()), places=12)
            md = out.with_suffix(".md").read_text()
            self.assertLess(md.index("| linf | "), md.index("| fog | "))
            self.assertIn(f"{100 * mat['sum']:+.1f}", md)
        proc = run_script("eval.py", "--tradeoff", root / "start.json", expect=2)   # one file is not a matrix
        self.assertIn("at least one row", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)


class TestSeedAggregation(ExperimentTest):
    def test_seeds_then_eval_then_aggregate(self):
        evals, train_s = {}, {}
        for sampler, seeds in (("cas", (0, 1)), ("sat", (0, 1, 2))):
            for seed in seeds:
                run_dir = self.tmp / "t1" / sampler / f"s{seed}"
                run_script("cas.py", *FAST, "--init-ckpt", self.pre / "model.pt", "--epochs", "1", "--max-steps",
                           "2", "--sampler", sampler, "--seed", seed, "--out-dir", run_dir)
                run_script("eval.py", "--ckpt", run_dir / "model.pt", "--attacks", "linf,l2,l1,fog", "--steps", "1",
                           "--n-examples", "16", "--label", sampler)
                evals.setdefault(sampler, []).append(json.loads((run_dir / "eval.json").read_text()))
                res = json.loads((run_dir / "results.json").read_text())
                train_s.setdefault(sampler, []).append(res["time/train_s"])
        out = self.tmp / "t1" / "table1.md"
        files = sorted((self.tmp / "t1").glob("*/s*/eval.json"))
        run_script("eval.py", "--aggregate", *files, "--out", out)
        table = json.loads(out.with_suffix(".json").read_text())
        self.assertEqual(set(table), {"cas", "sat"})
        for sampler, es in evals.items():
            for key, vals in (("clean", [e["clean_acc"] for e in es]), ("avg_robust", [e["avg_robust"] for e in es]),
                              ("avg_lp", [e["avg_lp"] for e in es]), ("avg_semantic", [e["avg_semantic"] for e in es])):
                t = torch.tensor(vals, dtype=torch.float64)
                mean, std = table[sampler][key]
                self.assertAlmostEqual(mean, t.mean().item(), places=12)
                self.assertAlmostEqual(std, t.std(unbiased=True).item(), places=12)
            self.assertEqual(sorted(table[sampler]["train_seeds"]), list(range(len(es))))
            # Table 2's column is the fine-tuning time alone (time/train_s), not the run's wall-clock
            self.assertAlmostEqual(table[sampler]["wall_min"][0], sum(train_s[sampler]) / len(es) / 60, places=9)
        md = out.read_text()
        self.assertIn("avg. Robust", md)
        self.assertIn("| sat | 3 |", md)
        bad = self.tmp / "bad.json"   # an incomplete or foreign file is refused with its name, in one line
        bad.write_text(json.dumps({"format": 0}))
        proc = run_script("eval.py", "--aggregate", bad, expect=2)
        self.assertIn("not an eval.json", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
    unittest.main()
