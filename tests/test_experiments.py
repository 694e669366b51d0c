"""CAS experiments (issue 8): calibration (Eq. 11) on a scripted accuracy function, the trade-off matrix mode and the
seed aggregation of eval.py, end to end on fake data."""

import argparse
import json
import math
import shutil
import tempfile
import unittest
from pathlib import Path

import torch

import cas
from tests.test_scripts import FAST, run_script, strip_timing


class TestCalibrationScripted(unittest.TestCase):
    """cas.calibrate against a known accuracy-vs-eps curve: no model, no data, just Eq. (11)."""

    def run_calibrate(self, acc_of_eps, names, rounds=6, lam=0.6, start=None):
        calls = []

        def fake_make_arms(names_, dataset, steps, for_eval=False, eps_table=None):
            self.assertTrue(for_eval)                          # calibration measures at evaluation strength
            return {n: eps_table[n] for n in names_}

        def fake_evaluate(model, x, y, arms, batch_size, seed):
            calls.append(dict(arms))
            return {"attacks": {n: acc_of_eps[n](eps) for n, eps in arms.items()}}

        args = argparse.Namespace(calib_range=(0.2, 0.6), calib_rounds=rounds, calib_lambda=lam,
                                  eval_attack_steps=20, batch_size=8, seed=0)
        saved = cas.make_arms, cas.evaluate
        cas.make_arms, cas.evaluate = fake_make_arms, fake_evaluate
        try:
            table, report = cas.calibrate(None, None, None, names, "cifar10", dict(start or {}), args)
        finally:
            cas.make_arms, cas.evaluate = saved
        return table, report, calls

    def test_converges_into_the_target_range(self):
        # accuracy falls with eps; fog starts too strong (acc 0.0003), snow too weak (acc 0.998), wood already inside
        curves = {"fog": lambda e: math.exp(-20 * e), "snow": lambda e: 1 / (1 + (e / 20) ** 4),
                  "wood": lambda e: 0.4}
        table, report, calls = self.run_calibrate(curves, ["linf", "fog", "snow", "wood"])
        self.assertEqual(set(report), {"fog", "snow", "wood"})   # l_p budgets are never calibrated
        self.assertNotIn("linf", table)
        for name, r in report.items():
            self.assertTrue(r["in_range"], (name, r))
            self.assertTrue(0.2 <= curves[name](table[name]) <= 0.6)
            for (eps, acc), (eps_next, _) in zip(r["history"], r["history"][1:]):
                self.assertAlmostEqual(eps_next, (0.6 + acc) * eps, places=12)   # Eq. (11)
        self.assertEqual(report["wood"]["rounds"], 0)
        self.assertLess(report["fog"]["history"][-1][0], report["fog"]["history"][0][0])   # too strong: eps shrinks
        self.assertGreater(report["snow"]["history"][-1][0], report["snow"]["history"][0][0])  # too weak: grows
        self.assertEqual(len(calls), sum(r["rounds"] + 1 for r in report.values()))

    def test_bounded_rounds_and_reported_failure(self):
        # an attack whose accuracy does not depend on eps can never reach the range: stop after --calib-rounds
        table, report, _ = self.run_calibrate({"fog": lambda e: 0.9}, ["fog"], rounds=3, start={"fog": 0.1})
        self.assertFalse(report["fog"]["in_range"])
        self.assertEqual(report["fog"]["rounds"], 3)
        self.assertAlmostEqual(table["fog"], 0.1 * 1.5 ** 3, places=12)   # (0.6 + 0.9)^3 * eps_0


class ExperimentTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="cas_exp_"))
        cls.pre = cls.tmp / "pre"
        run_script("cas.py", *FAST, "--pretrain-epochs", "1", "--epochs", "0", "--out-dir", cls.pre)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)


class TestTradeoffMatrix(ExperimentTest):
    def matrix(self, out, *extra, expect=0):
        return run_script("cas.py", *FAST[:-1], "linf,fog,hsv", "--init-ckpt", self.pre / "model.pt",
                          "--tradeoff-matrix", "--epochs", "1", "--max-steps", "2", "--out-dir", out, *extra,
                          expect=expect)

    def test_matrix_end_to_end_and_resume(self):
        full = self.tmp / "matrix"
        self.matrix(full)
        mat = json.loads((full / "tradeoff_matrix.json").read_text())
        names = ["linf", "fog", "hsv"]
        self.assertEqual(mat["attacks"], names)
        self.assertEqual(set(mat["rows"]), set(names))
        for k, row in mat["rows"].items():
            self.assertEqual(json.loads((full / "rows" / k / "args.json").read_text())["attacks"], k)  # k alone
            for j in names:
                self.assertAlmostEqual(row["delta"][j], row["attacks"][j] - mat["start"]["attacks"][j], places=12)
        self.assertAlmostEqual(mat["sum"], sum(sum(r["delta"].values()) for r in mat["rows"].values()), places=12)
        md = (full / "tradeoff_matrix.md").read_text()
        self.assertLess(md.index("| linf | "), md.index("| fog | "))   # rows in --attacks order
        self.assertIn(f"{100 * mat['sum']:+.1f}", md)
        # a crash inside the first row, then the same command again: the same matrix as the uninterrupted one
        cut = self.tmp / "matrix_cut"
        self.matrix(cut, "--interrupt-at-step", "1", expect=3)
        self.assertFalse((cut / "rows" / "linf" / "model.pt").exists())
        self.matrix(cut)
        again = json.loads((cut / "tradeoff_matrix.json").read_text())
        self.assertEqual(strip_timing({k: strip_timing(r) for k, r in again["rows"].items()}),
                         strip_timing({k: strip_timing(r) for k, r in mat["rows"].items()}))
        self.assertEqual(again["sum"], mat["sum"])

    def test_sequential_rows_chain_models_and_measure_against_the_previous_row(self):
        out = self.tmp / "matrix_seq"
        self.matrix(out, "--tradeoff-sequential", "--max-steps", "1")
        mat = json.loads((out / "tradeoff_matrix.json").read_text())
        self.assertTrue(mat["sequential"])
        names = ["linf", "fog", "hsv"]
        for prev, k in zip(names, names[1:]):
            args = json.loads((out / "rows" / k / "args.json").read_text())
            self.assertEqual(Path(args["init_ckpt"]), out / "rows" / prev / "model.pt")
            for j in names:
                self.assertAlmostEqual(mat["rows"][k]["delta"][j],
                                       mat["rows"][k]["attacks"][j] - mat["rows"][prev]["attacks"][j], places=12)
        self.assertIn("sequential", (out / "tradeoff_matrix.md").read_text())
        proc = self.matrix(out, "--max-steps", "1", expect=1)   # not the same experiment: refused, nothing lost
        self.assertIn("sequential True", proc.stderr)

    def test_matrix_needs_a_pretrained_model_and_the_same_attacks(self):
        proc = run_script("cas.py", *FAST, "--tradeoff-matrix", "--out-dir", self.tmp / "m_bad", expect=1)
        self.assertIn("--init-ckpt", proc.stderr)
        out = self.tmp / "m_other"
        self.matrix(out, "--eval-examples", "4", "--max-steps", "1")
        proc = run_script("cas.py", *FAST, "--init-ckpt", self.pre / "model.pt", "--tradeoff-matrix",
                          "--out-dir", out, expect=1)
        self.assertIn("was made for --attacks linf,fog,hsv", proc.stderr)


class TestSeedAggregation(ExperimentTest):
    def test_seeds_then_eval_then_aggregate(self):
        evals = {}
        for sampler, seeds in (("cas", (0, 1)), ("sat", (0, 1, 2))):
            for seed in seeds:
                run_dir = self.tmp / "t1" / sampler / f"s{seed}"
                run_script("cas.py", *FAST, "--init-ckpt", self.pre / "model.pt", "--epochs", "1", "--max-steps",
                           "2", "--sampler", sampler, "--seed", seed, "--out-dir", run_dir)
                run_script("eval.py", "--ckpt", run_dir / "model.pt", "--attacks", "linf,l2,l1,fog", "--steps", "1",
                           "--n-examples", "16", "--label", sampler)
                evals.setdefault(sampler, []).append(json.loads((run_dir / "eval.json").read_text()))
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
            self.assertGreater(table[sampler]["wall_min"][0], 0)
        md = out.read_text()
        self.assertIn("avg. Robust", md)
        self.assertIn("| sat | 3 |", md)
        # an incomplete or foreign file is refused with its name
        bad = self.tmp / "bad.json"
        bad.write_text(json.dumps({"format": 0}))
        proc = run_script("eval.py", "--aggregate", bad, expect=1)
        self.assertIn("not an eval.json", proc.stderr)


if __name__ == "__main__":
    unittest.main()
