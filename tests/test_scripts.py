"""Each script run as a user runs it (subprocess, fake data, a couple of steps), its outputs checked; resume and
determinism; bad inputs give clear errors."""

import json
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow   # end-to-end runs of the scripts (pytest -m 'not slow' skips them)

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--dataset", "fake", "--device", "cpu", "--width", "8", "--attack-steps", "1", "--eval-attack-steps", "1",
        "--eval-examples", "8", "--attacks", "linf,l2,l1"]


def run_script(script, *args, expect=0, timeout=600):
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode} (expected {expect})\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def strict_loads(text):
    """json.loads that rejects NaN / Infinity, as jq and JavaScript do."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def read_log(path, drop_timing=True):
    rows = [strict_loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    if drop_timing:
        rows = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    return rows


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if not k.startswith("time/")}
    return obj


class ScriptTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="cas_test_"))
        # one pre-train + fine-tune run that the other tests start from
        cls.base = cls.tmp / "base"
        cls.base_proc = run_script("cas.py", *FAST, "--pretrain-epochs", "1", "--epochs", "1", "--max-steps", "2",
                                   "--log-every", "1", "--out-dir", cls.base)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)


class TestCasOutputs(ScriptTest):
    def test_run_directory(self):
        for f in ("args.json", "log.jsonl", "ckpt.pt", "model.pt", "results.json", "pretrain_model.pt"):
            self.assertTrue((self.base / f).is_file(), f)
        args = json.loads((self.base / "args.json").read_text())
        self.assertEqual([st["name"] for st in args["stages"]], ["pretrain", "finetune"])
        self.assertEqual((args["stages"][0]["attacks"], args["stages"][0]["beta"], args["stages"][0]["sampler"]),
                         (["linf"], 1.0, "sat"))   # pre-training = SAT on one l_p arm with beta 1
        self.assertEqual(args["stages"][1]["attacks"], ["linf", "l2", "l1"])
        self.assertEqual(args["stages"][1]["weights"], [6.0, 6.0, 6.0])
        log = read_log(self.base / "log.jsonl")
        epochs = [r for r in log if "test/acc_clean" in r]
        self.assertEqual([(r["phase"], r["epoch"]) for r in epochs], [("pretrain", 1), ("finetune", 0), ("finetune", 1)])
        for key in ("test/acc/linf", "test/acc/l2", "test/acc/l1", "test/avg_robust", "test/avg_lp", "train/loss",
                    "cas/arm_prob/linf", "cas/r_self/l1", "cas/r_tradeoff/l2", "cas/pulls/linf", "train/pulls/l1"):
            self.assertIn(key, epochs[-1], key)
        self.assertEqual(sum(epochs[-1][f"train/pulls/{n}"] for n in ("linf", "l2", "l1")), 2)
        results = strict_loads((self.base / "results.json").read_text())   # NaN is written as null
        self.assertEqual(results["steps"], 4)
        self.assertIsNone(results["final"]["avg_semantic"])   # no semantic attack: an empty mean
        self.assertIsNone(epochs[-1]["test/avg_semantic"])
        for stage in ("initial", "final"):
            self.assertEqual(set(results[stage]["attacks"]), {"linf", "l2", "l1"})
            self.assertTrue(0 <= results[stage]["clean"] <= 1)
        model = torch.load(self.base / "model.pt", weights_only=True)
        self.assertEqual((model["arch"], model["width"], model["num_classes"]), ("preact_resnet18", 8, 10))
        self.assertIn("layer4.1.conv2.weight", model["model"])
        self.assertNotIn("normalize.mean", model["model"])   # normalisation has no state_dict entries
        ckpt = torch.load(self.base / "ckpt.pt", weights_only=True)
        for key in ("optimizer", "scheduler", "sampler", "rng", "args", "epoch", "step"):
            self.assertIn(key, ckpt)

    def test_console_progress_and_summary(self):
        """Progress inside epochs (rate, ETA), the evaluation time, the before/after table, lines <= 100 chars."""
        out = self.base_proc.stdout
        self.assertRegex(out, r"  finetune epoch 1/1 \| it 1/2 \| [\d.]+ it/s \| loss [\d.]+ \| ETA epoch [\d.]+s, "
                              r"finetune [\d.]+s\n")
        self.assertRegex(out, r"finetune epoch 0 \| step 2 \| starting model \| clean [\d.]+ \| avg robust "
                              r"[\d.]+ \| eval [\d.]+s")
        results = json.loads((self.base / "results.json").read_text())
        for label, key in (("clean", "clean"), ("avg robust", "avg_robust")):
            before, after = results["initial"][key], results["final"][key]
            cells = r" +".join(re.escape(f"{v:{f}}") for v, f in ((before, ".3f"), (after, ".3f"), (after - before, "+.3f")))
            self.assertRegex(out, rf"\n{label} +{cells}\n")
        self.assertRegex(out, r"\nl1 +[\d.]+ +[\d.]+ +[-+][\d.]+\ndone in ")
        self.assertLessEqual(max(len(ln) for ln in out.splitlines() if str(self.base) not in ln), 100)

    def test_log_schema(self):
        """One schema (README, "Logged metrics"): kind epoch | bandit, phase, epoch counted from 1 (0 = the
        starting model) in both kinds, step; a bandit line belongs to the epoch whose record follows it."""
        log = read_log(self.base.parent / "schema" / "log.jsonl") if (self.base.parent / "schema").exists() else None
        if log is None:
            run_script("cas.py", *FAST, "--init-ckpt", self.base / "model.pt", "--epochs", "2", "--batch-size", "64",
                       "--log-every", "2", "--out-dir", self.base.parent / "schema")
            log = read_log(self.base.parent / "schema" / "log.jsonl")
        for rec in log:
            self.assertIn(rec["kind"], ("epoch", "bandit"))
            self.assertEqual({"kind", "phase", "epoch", "step"} - set(rec), set())
        epochs = [r for r in log if r["kind"] == "epoch"]
        self.assertEqual([r["epoch"] for r in epochs], [0, 1, 2])
        bandit = [r for r in log if r["kind"] == "bandit"]
        self.assertEqual([(r["epoch"], r["step"]) for r in bandit], [(1, 2), (1, 4), (2, 6), (2, 8)])
        for b in bandit:   # the next epoch record after a bandit line has the bandit line's epoch
            self.assertEqual(next(e["epoch"] for e in epochs if e["step"] >= b["step"]), b["epoch"])
            self.assertIn("cas/arm_prob/linf", b)
        self.assertTrue(all(k.startswith(("test/", "kind", "phase", "epoch", "step", "time/")) for k in epochs[0]))

    def test_table2_time_is_training_alone(self):
        """results.json time/train_s (the paper's Table 2) = the fine-tuning epochs' training loops, no evaluation."""
        res = json.loads((self.base / "results.json").read_text())
        log = read_log(self.base / "log.jsonl", drop_timing=False)
        ft = [r["time/train_s"] for r in log if r["kind"] == "epoch" and r["phase"] == "finetune" and r["epoch"]]
        self.assertAlmostEqual(res["time/train_s"], sum(ft), places=9)
        evals = sum(r["time/eval_s"] for r in log if "time/eval_s" in r)
        self.assertGreater(evals, 0)
        self.assertLess(res["time/train_s"] + res["time/pretrain_s"] + evals, res["time/total_s"] + 1e-6)

    def test_every_sampler_runs(self):
        for sampler in ("sat", "eat", "order", "avg"):
            with self.subTest(sampler=sampler):
                out = self.tmp / f"s_{sampler}"
                run_script("cas.py", *FAST, "--init-ckpt", self.base / "model.pt", "--sampler", sampler,
                           "--epochs", "1", "--max-steps", "2", "--out-dir", out)
                res = json.loads((out / "results.json").read_text())
                self.assertEqual((res["sampler"], res["steps"]), (sampler, 2))
                log = read_log(out / "log.jsonl")
                self.assertTrue(all("test/acc_clean" in r for r in log if r.get("kind") != "bandit"))

    def test_ablation_flags_and_foreign_state_dict(self):
        """--no-tradeoff --no-ucb run; a plain state_dict with a DataParallel 'module.' prefix loads."""
        sd = torch.load(self.base / "model.pt", weights_only=True)["model"]
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, self.tmp / "foreign.pth")
        out = self.tmp / "ablation"
        run_script("cas.py", *FAST, "--init-ckpt", self.tmp / "foreign.pth", "--no-tradeoff", "--no-ucb",
                   "--epochs", "1", "--max-steps", "1", "--out-dir", out)
        init = json.loads((out / "results.json").read_text())["initial"]
        base_final = json.loads((self.base / "results.json").read_text())["final"]
        self.assertEqual(init["clean"], base_final["clean"])   # same weights, same eval subset -> same accuracy


class TestCalibration(ScriptTest):
    def test_calibrate_follows_eq_11_and_the_table_is_reused(self):
        out = self.tmp / "calib"
        lam, lo, hi, rounds = 0.6, 0.2, 0.6, 2
        run_script("cas.py", *FAST[:-1], "linf,fog", "--init-ckpt", self.base / "model.pt", "--epochs", "1",
                   "--max-steps", "1", "--calibrate", "--calib-examples", "16", "--calib-rounds", rounds,
                   "--calib-lambda", lam, "--out-dir", out)
        report = json.loads((out / "calibration.json").read_text())
        table = json.loads((out / "eps_table.json").read_text())
        self.assertEqual(set(report), {"fog"})   # only semantic arms are calibrated; l_p budgets are fixed
        hist = report["fog"]["history"]
        self.assertEqual(hist[0][0], 0.4)        # starts from the attack's CIFAR-10 medium eps
        for (eps, acc), (eps_next, _) in zip(hist, hist[1:]):
            self.assertFalse(lo <= acc <= hi)    # an update happens only outside the target range
            self.assertAlmostEqual(eps_next, (lam + acc) * hist[0][0], places=12)   # Eq. (11), original margin
        self.assertLessEqual(len(hist), rounds + 1)
        self.assertIn(table["fog"], [eps for eps, _ in hist])   # the last measured eps, or the fixed point it repeats
        self.assertEqual(torch.load(out / "model.pt", weights_only=True)["eps_table"], table)
        # the written table is accepted back by --eps-table (and by eval.py, same format)
        reuse = self.tmp / "calib_reuse"
        run_script("cas.py", *FAST[:-1], "linf,fog", "--init-ckpt", self.base / "model.pt", "--epochs", "1",
                   "--max-steps", "1", "--eps-table", out / "eps_table.json", "--out-dir", reuse)
        self.assertEqual(json.loads((reuse / "results.json").read_text())["eps_table"], table)
        (self.tmp / "bad_table.json").write_text(json.dumps({"fog": -1.0}))
        proc = run_script("cas.py", *FAST, "--eps-table", self.tmp / "bad_table.json", "--out-dir", reuse / "x",
                          expect=2)
        self.assertIn("eps must be finite numbers >= 0", proc.stderr)


class TestResumeAndDeterminism(ScriptTest):
    def test_resume_after_interruption_matches_uninterrupted_run(self):
        # 2 epochs x 4 steps (256 fake images, batch 64); the crash after step 6 loses half of epoch 2
        init = self.tmp / "init_moved_later.pt"
        shutil.copy(self.base / "model.pt", init)
        (self.tmp / "eps_resume.json").write_text(json.dumps({"linf": 4 / 255}))   # must survive the resume
        common = [*FAST, "--init-ckpt", init, "--epochs", "2", "--batch-size", "64", "--log-every", "3",
                  "--eps-table", self.tmp / "eps_resume.json"]
        full, cut = self.tmp / "full", self.tmp / "cut"
        run_script("cas.py", *common, "--out-dir", full)
        run_script("cas.py", *common, "--out-dir", cut, "--interrupt-at-step", "6", expect=3)
        self.assertFalse((cut / "results.json").exists())
        init.rename(self.tmp / "init_elsewhere.pt")   # resuming needs the run directory only
        run_script("cas.py", "--resume", cut, "--device", "cpu")
        a = json.loads((full / "results.json").read_text())
        b = json.loads((cut / "results.json").read_text())
        self.assertEqual(strip_timing(a["final"]), strip_timing(b["final"]))
        self.assertEqual(read_log(full / "log.jsonl"), read_log(cut / "log.jsonl"))
        wa = torch.load(full / "model.pt", weights_only=True)["model"]
        wb = torch.load(cut / "model.pt", weights_only=True)["model"]
        self.assertTrue(all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ after resume")

    def test_same_seed_same_log_other_seed_different(self):
        common = [*FAST, "--init-ckpt", self.base / "model.pt", "--epochs", "1", "--max-steps", "3",
                  "--log-every", "1"]
        logs = {}
        for name, seed in (("a", 0), ("b", 0), ("c", 1)):
            run_script("cas.py", *common, "--seed", seed, "--out-dir", self.tmp / f"det_{name}")
            logs[name] = read_log(self.tmp / f"det_{name}" / "log.jsonl")
        self.assertEqual(logs["a"], logs["b"])
        self.assertNotEqual(logs["a"], logs["c"])

    def test_existing_run_is_not_overwritten(self):
        proc = run_script("cas.py", *FAST, "--init-ckpt", self.base / "model.pt", "--epochs", "1", "--max-steps", "1",
                          "--out-dir", self.base, expect=2)
        self.assertIn("--resume", proc.stderr)


class TestBadInputs(ScriptTest):
    def assert_error(self, args, *needles):
        """A user error: exit 2, argparse's 'usage ... error: <one line>' naming the value, no traceback, nothing
        written (the --out-dir is never created)."""
        out = self.tmp / "bad_never_created"
        proc = run_script("cas.py", *args, *([] if "--resume" in map(str, args) else ["--out-dir", out]), expect=2)
        for needle in needles:
            self.assertIn(needle, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertEqual(len([l for l in proc.stderr.splitlines() if "error:" in l]), 1, proc.stderr)
        self.assertFalse(out.exists(), "a rejected command left a run directory")

    def test_bad_inputs_give_one_clear_line(self):
        self.assert_error(["--dataset", "mnist"], "invalid choice: 'mnist'", "cifar10")
        self.assert_error([*FAST, "--attacks", "linf,nope"], "unknown attack(s) ['nope']", "registered attacks: linf")
        self.assert_error([*FAST, "--alpha", "-3"], "--alpha -3.0", "> 0")
        self.assert_error([*FAST, "--beta", "1.5"], "--beta 1.5", "[0, 1]")
        self.assert_error([*FAST, "--batch-size", "0"], "--batch-size 0", ">= 1")
        self.assert_error([*FAST, "--window", "1"], "--window 1", ">= 2")
        self.assert_error([*FAST, "--eps", "0.03"], "unrecognized arguments: --eps")   # no prefix matching
        empty = self.tmp / "empty_data"
        empty.mkdir(exist_ok=True)
        self.assert_error(["--dataset", "cifar10", "--data-dir", empty, "--no-download"],
                          "cifar-10-batches-py/data_batch_1", str(empty))
        self.assert_error([*FAST[:4], "--width", "16", *FAST[6:], "--init-ckpt", self.base / "model.pt"],
                          "shape mismatches", "conv1.weight")
        torch.save({"model": torch.nn.Linear(2, 2)}, self.tmp / "module.pt")   # a pickled module, not weights
        self.assert_error([*FAST, "--init-ckpt", self.tmp / "module.pt"], "not a plain weights checkpoint")
        torch.save({"epoch": 3, "note": "no weights"}, self.tmp / "noweights.pt")
        self.assert_error([*FAST, "--init-ckpt", self.tmp / "noweights.pt"], "not a state_dict")
        self.assert_error([*FAST, "--init-ckpt", self.tmp / "missing.pt"], "checkpoint not found")
        self.assert_error(["--resume", self.tmp / "missing_run"], "checkpoint not found")
        self.assert_error(["--resume", self.base / "model.pt"], "not a ckpt.pt written by cas.py")

    def test_other_scripts_reject_bad_input_the_same_way(self):
        for script in ("caat_meta.py", "caat_reinforce.py"):
            with self.subTest(script=script):
                proc = run_script(script, "--dataset", "fake", "--batch-size", "0", expect=2)
                self.assertIn("--batch-size 0", proc.stderr)
                self.assertNotIn("Traceback", proc.stderr)
        proc = run_script("eval.py", "--ckpt", self.tmp / "missing.pt", expect=2)
        self.assertIn("checkpoint not found", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)

    def test_no_prefix_matching_anywhere(self):
        """allow_abbrev=False in every parser: a prefix of a flag is an error, not that flag."""
        for cmd, flag in (("caat_meta.py", "--batch"), ("caat_reinforce.py", "--batch"), ("eval.py", "--n-ex"),
                          ("theory.py", "--qui"), ("-m attacks", "--gal")):
            with self.subTest(cmd=cmd):
                argv = [sys.executable, *cmd.split(), flag, "8"] if cmd.startswith("-m") else \
                    [sys.executable, str(ROOT / cmd), flag, "8"]
                proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertIn(f"unrecognized arguments: {flag}", proc.stderr)


if __name__ == "__main__":
    unittest.main()
