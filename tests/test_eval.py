"""eval.py end to end on a tiny cas.py checkpoint (fake data, CPU), and its pieces on hand-made inputs.

A tiny model.pt is made once by running cas.py as a subprocess; eval.py then runs as a user would run it, also on
foreign checkpoints (a PreActResNet-18 state_dict of another width, a user's own class via --arch). The sanity
check, the CAAT class-wise metrics, --level handling, --compare and evaluate_model are called directly (import eval).
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import types
import unittest
from pathlib import Path

import pytest
import torch

import attacks
import eval as ev

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--n-examples", "16", "--steps", "1", "--batch-size", "8", "--device", "cpu"]
FAST8 = ["--n-examples", "8", "--steps", "1", "--batch-size", "8", "--device", "cpu", "--dataset", "fake",
         "--attacks", "linf", "--caat-pgd", ""]


def run(*argv, ok=True):
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if ok and proc.returncode != 0:
        raise AssertionError(f"eval.py {' '.join(map(str, argv))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
class TestEvalScript(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="test_eval_"))
        proc = subprocess.run(
            [sys.executable, str(ROOT / "cas.py"), "--dataset", "fake", "--device", "cpu", "--width", "8",
             "--pretrain-epochs", "1", "--epochs", "0", "--max-steps", "1", "--attack-steps", "1",
             "--eval-attack-steps", "1", "--eval-examples", "8", "--attacks", "linf",
             "--out-dir", str(cls.tmp / "run")],
            capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        cls.ckpt = cls.tmp / "run" / "model.pt"
        cls.out = cls.tmp / "a" / "eval.json"
        cls.proc = run("--ckpt", cls.ckpt, "--out", cls.out, "--attacks", "linf,fog", "--caat-pgd", "10",
                       "--autoattack", "linf", "--aa-version", "apgd", "--save-examples", cls.tmp / "ex.png", *FAST)
        cls.res = json.loads(cls.out.read_text(), parse_constant=lambda c: {}[c])   # strict JSON: no NaN

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_schema_values_and_outputs(self):
        r = self.res
        for key in ("ckpt", "dataset", "n", "seed", "clean_acc", "attacks", "avg_lp", "avg_semantic", "avg_all",
                    "union_acc", "avg_robust", "autoattack", "pgd", "weights", "complete"):
            self.assertIn(key, r)
        self.assertEqual((r["dataset"], r["n"], r["seed"], r["complete"]), ("fake", 16, 0, True))
        self.assertEqual(set(r["attacks"]), {"linf", "fog"})
        self.assertEqual(list(r["pgd"]), ["pgd10"])
        self.assertEqual(list(r["autoattack"]), ["linf"])
        entries = list(r["attacks"].values()) + list(r["pgd"].values()) + list(r["autoattack"].values())
        for e in entries:
            for key in ("acc", "eps", "steps", "max_pert", "time_s", "correct", "kwargs"):
                self.assertIn(key, e)
            self.assertEqual(len(e["correct"]), 16)
        values = [r["clean_acc"], r["avg_lp"], r["avg_semantic"], r["avg_all"], r["union_acc"]] + \
            [e["acc"] for e in entries] + [v for e in r["pgd"].values() for k, v in e["classwise"].items()
                                           if k in ("avg_nat", "worst_nat", "avg_bdy", "worst_bdy", "avg_rob",
                                                    "worst_rob")]
        for v in values:
            self.assertTrue(0.0 <= v <= 1.0, v)
        self.assertEqual(r["weights"], {"linf": 6.0, "fog": 1.0})                      # CAS Sec. 5.1
        self.assertAlmostEqual(r["avg_all"], (6 * r["attacks"]["linf"]["acc"] + r["attacks"]["fog"]["acc"]) / 7)
        self.assertLessEqual(r["union_acc"], min([r["clean_acc"]] + [e["acc"] for e in entries]) + 1e-12)
        self.assertLessEqual(r["attacks"]["linf"]["max_pert"], 8 / 255 + 1e-6)
        self.assertEqual(r["attacks"]["linf"]["steps"], 1)                           # --steps
        self.assertTrue((self.out.with_suffix(".md")).read_text().startswith("- **"))
        self.assertIn("| Dataset | Accuracy |", self.proc.stdout)
        self.assertIn("Avg. Bdy.", self.proc.stdout)
        self.assertIn("[4/4]", self.proc.stdout)
        self.assertIn("ETA", self.proc.stdout)
        self.assertRegex(self.proc.stdout, r"AutoAttack-linf \(apgd\) on \d+ points: about ")
        for component in ("clean", "apgd-ce", "apgd-t"):   # AutoAttack's own log, one line per component
            self.assertRegex(self.proc.stdout, rf"AutoAttack-linf {component} *: \d+/16 still robust, robust "
                                               rf"accuracy [\d.]+% \([\d.]+s\)")
        self.assertTrue((self.tmp / "ex.png").stat().st_size > 0)

    def test_foreign_state_dict_with_module_prefix(self):
        sd = torch.load(self.ckpt, map_location="cpu", weights_only=True)["model"]
        plain = self.tmp / "foreign.pt"
        torch.save({"module." + k: v for k, v in sd.items()}, plain)
        out = self.tmp / "foreign" / "eval.json"
        run("--ckpt", plain, "--out", out, "--width", "8", "--dataset", "fake", "--attacks", "linf",
            "--caat-pgd", "", *FAST)
        r = json.loads(out.read_text())
        self.assertEqual(r["clean_correct"], self.res["clean_correct"])   # same weights, same mean/std (fake's)
        self.assertEqual(r["attacks"]["linf"]["correct"], self.res["attacks"]["linf"]["correct"])
        proc = run("--ckpt", plain, "--out", self.tmp / "foreign2.json", "--width", "64", *FAST8, ok=False)
        self.assertEqual(proc.returncode, 2)                              # a flag that does not fit: one line
        self.assertIn("--width 64 does not fit the weights", proc.stderr)
        self.assertIn("width 8", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)

    def test_foreign_width16_inferred_from_the_weights(self):
        """A colleague's PreActResNet-18 (width 16, {"state_dict": ...} with a `module.` prefix) loads with no model
        flag, says what it inferred, and scores as the same weights loaded our way (evaluate_model, in-process)."""
        torch.manual_seed(0)
        fake = ev.DATASETS["fake"]
        ours = ev.build_model(10, fake["mean"], fake["std"], width=16)
        for m in ours.modules():   # non-trivial BN statistics, so that a wrong load would show
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        path = self.tmp / "colleague" / "preact16.pt"
        path.parent.mkdir()
        torch.save({"state_dict": {"module." + k: v for k, v in ours.state_dict().items()}, "epoch": 3}, path)
        proc = run("--ckpt", path, *FAST8)
        self.assertIn("inferred from the weights: width 16, 10 classes", proc.stdout)
        r = json.loads((path.parent / "eval.json").read_text())
        self.assertEqual((r["model"]["width"], r["model"]["num_classes"]), (16, 10))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # as the subprocess (OMP_NUM_THREADS=1): bitwise the same arithmetic
        try:
            want = ev.evaluate_model(ours, dataset="fake", attacks="linf", caat_pgd="", n_examples=8, steps=1,
                                     batch_size=8, device="cpu")
        finally:
            torch.set_num_threads(threads)
        for key in ("clean_acc", "clean_correct", "avg_robust"):
            self.assertEqual(r[key], want[key], key)
        self.assertEqual(r["attacks"]["linf"]["correct"], want["attacks"]["linf"]["correct"])
        with self.assertRaisesRegex(TypeError, "unknown options"):
            ev.evaluate_model(ours, dataset="fake", n_exemples=8)

    def test_any_architecture_from_a_file(self):
        """--arch path/to/file.py:Class (+ --arch-kwargs): the user's own class, its state_dict loaded into it."""
        src = self.tmp / "user_code" / "tiny_net.py"
        src.parent.mkdir()
        src.write_text(textwrap.dedent("""
            import torch.nn as nn


            class Net(nn.Module):
                def __init__(self, hidden=4):
                    super().__init__()
                    self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, hidden), nn.ReLU(),
                                              nn.Linear(hidden, 10))

                def forward(self, x):   # x in [0, 1]: normalisation is the model's own business
                    return self.body(x - 0.5)
            """))
        scope = {}
        exec(src.read_text(), scope)
        torch.manual_seed(0)
        net = scope["Net"](hidden=6).eval()
        ckpt = self.tmp / "user_code" / "net.pt"
        torch.save({"module." + k: v for k, v in net.state_dict().items()}, ckpt)
        out = self.tmp / "user_code" / "eval.json"
        run("--ckpt", ckpt, "--arch", f"{src}:Net", "--arch-kwargs", '{"hidden": 6}', "--out", out, *FAST8)
        r = json.loads(out.read_text())
        x_u8, y = ev.fake_split(ev.FAKE_SIZES[1], 1)
        with torch.no_grad():
            self.assertEqual(r["clean_correct"], ev.bits(net(ev.to_float(x_u8[:8])).argmax(1) == y[:8]))
        self.assertEqual(r["model"], {"arch": f"{src}:Net", "num_classes": 10})
        self.assertEqual(len(r["attacks"]["linf"]["correct"]), 8)
        proc = run("--ckpt", ckpt, "--arch", f"{src}:Net", *FAST8, ok=False)   # hidden 4: the weights do not fit
        self.assertEqual(proc.returncode, 2)
        self.assertIn("does not fit --arch", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)

    def test_resume_skips_finished_and_reseeding(self):
        out = self.tmp / "resume" / "eval.json"
        out.parent.mkdir()
        partial = json.loads(self.out.read_text())
        partial["attacks"]["linf"]["time_s"] = 12345.0      # marker: must survive, i.e. linf is not re-run
        del partial["attacks"]["fog"]                        # as if killed during fog
        out.write_text(json.dumps(partial))
        proc = run("--ckpt", self.ckpt, "--out", out, "--attacks", "linf,fog", "--caat-pgd", "10", "--resume", *FAST)
        r = json.loads(out.read_text())
        self.assertIn("skip linf", proc.stdout)
        self.assertIn("[1/1] fog", proc.stdout)             # only fog ran (pgd10, autoattack were done)
        self.assertEqual(r["attacks"]["linf"]["time_s"], 12345.0)
        for key in ("correct", "max_pert", "acc"):           # identical numbers, although linf did not run before
            self.assertEqual(r["attacks"]["fog"][key], self.res["attacks"]["fog"][key])
        self.assertIn("linf", r["autoattack"])               # entries not asked for this time are kept
        self.assertEqual(r["union_acc"], self.res["union_acc"])
        proc = run("--ckpt", self.ckpt, "--out", out, *FAST, ok=False)   # no --resume: refuse to overwrite
        self.assertIn("--resume", proc.stderr)
        proc = run("--ckpt", self.ckpt, "--out", out, "--resume", "--attack-bf16", *FAST, ok=False)   # fp32 file
        self.assertEqual(proc.returncode, 2)
        self.assertIn("attack_bf16 = False, this run True; pass --no-attack-bf16", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)

    def test_reseeding_in_process(self):
        """The adversarial images of fog do not depend on whether linf consumed random numbers before it."""
        model = ev.build_model_from_ckpt(self.ckpt)
        x_u8, y = ev.fake_split(16, 1)
        kw = ev.eval_kwargs("fog", "fake", "medium", {}, steps=1)
        fog = lambda m, x, yb: attacks.fog(m, x, yb, **kw)
        _, _, alone = ev.run_job(model, x_u8, y, fog, "fog", None, kw["eps"], 8, 0, 8)
        torch.manual_seed(123)
        ev.run_job(model, x_u8, y, lambda m, x, yb: attacks.linf(m, x, yb, steps=1), "linf", "linf", 8 / 255, 8, 0, 8)
        torch.rand(7)
        _, _, after = ev.run_job(model, x_u8, y, fog, "fog", None, kw["eps"], 8, 0, 8)
        self.assertTrue(torch.equal(alone, after))

    def test_compare(self):
        text = ev.main(ev.get_args(["--compare", str(self.out), str(self.out), "--labels", "SAT,CAS"]))
        self.assertIn("| Dataset | Accuracy | SAT | CAS |", text)
        self.assertIn("| Method | Avg. Nat. | Worst Nat. | Avg. Bdy. | Worst Bdy. | Avg. Rob. | Worst Rob. |", text)
        self.assertIn("| attack | SAT | CAS |", text)
        clean = f"{100 * self.res['clean_acc']:.2f}"
        self.assertIn(f"| fake | Clean | {clean} | {clean} |", text)
        with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
            ev.main(ev.get_args(["--compare", str(self.out), "--labels", "A,B"]))
        self.assertIn("--labels has 2 names for 1 files", err.getvalue())

    def test_bad_inputs(self):
        with self.assertRaisesRegex(ValueError, "registered attacks: linf, l2, l1"):
            ev.check_args(ev.make_parser().parse_args(["--ckpt", str(self.ckpt), "--attacks", "linf,nosuch", *FAST]))
        with self.assertRaisesRegex(FileNotFoundError, "checkpoint not found"):
            ev.check_args(ev.make_parser().parse_args(["--ckpt", str(self.tmp / "missing.pt"), *FAST]))
        with self.assertRaises(SystemExit), open("/dev/null", "w") as devnull:
            stderr, sys.stderr = sys.stderr, devnull
            try:
                ev.get_args(["--ckpt", str(self.ckpt), "--level", "extreme"])
            finally:
                sys.stderr = stderr
        with self.assertRaisesRegex(ValueError, "unknown norm"):
            ev.check_args(ev.make_parser().parse_args(["--ckpt", str(self.ckpt), "--autoattack", "l3", *FAST]))
        with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:   # the CLI: one line
            ev.get_args(["--ckpt", str(self.ckpt), "--autoattack", "l3", *FAST])
        self.assertIn("unknown norm", err.getvalue())


class TestPieces(unittest.TestCase):
    def test_autoattack_in_chunks_equals_per_batch_calls(self):
        """eval.py runs AutoAttack on all images at once with batch_size (component by component, as the official
        package logs it): the same points as calling it batch by batch, and one log line per component."""
        torch.manual_seed(0)
        model = ev.build_model(10, (0.5,) * 3, (0.25,) * 3, width=4).eval()
        x_u8, y = ev.fake_split(12, 1)
        x = ev.to_float(x_u8)
        kw = dict(norm="l2", eps=0.3, n_iter=3, n_queries=5, seed=0)
        lines = []
        x_adv, robust = attacks.autoattack(model, x, y, batch_size=5, log=lines.append, **kw)
        parts = [attacks.autoattack(model, x[i:i + 5], y[i:i + 5], **kw) for i in range(0, 12, 5)]
        self.assertTrue(torch.equal(x_adv, torch.cat([p[0] for p in parts])))
        self.assertTrue(torch.equal(robust, torch.cat([p[1] for p in parts])))
        self.assertEqual([ln.split()[1] for ln in lines][:2], ["clean", "apgd-ce"])
        self.assertIn(f"{int(robust.sum())}/12 still robust", lines[-1])
        self.assertEqual(ev.aa_cost("linf", "standard", 100, 5000, 10), (100 + 900 + 900, 900 + 5000))   # FAB-T x 9
        self.assertEqual(ev.aa_cost("l1", "apgd", 100, 5000, 10), (500 + 500, 0))

    def test_caat_pgd_follows_the_request(self):
        jobs = lambda *a: [(g, k) for g, k, *_ in ev.make_jobs(ev.make_parser().parse_args(list(a)), "fake", {})]  # noqa
        self.assertEqual(jobs("--attacks", "linf"), [("attacks", "linf")])
        self.assertEqual(jobs("--attacks", "linf", "--caat-pgd", "10"), [("attacks", "linf"), ("pgd", "pgd10")])
        self.assertEqual(jobs()[-2:], [("pgd", "pgd10"), ("pgd", "pgd20")])   # the default run: all attacks + both

    def test_sanity_check(self):
        x = torch.rand(3, 3, 8, 8) * 0.6 + 0.1
        eps = 8 / 255
        ok = (x + eps * torch.sign(torch.randn_like(x))).clamp(0, 1)
        self.assertAlmostEqual(ev.sanity_check("linf", x, ok, norm="linf", eps=eps)["max_pert"], eps, places=6)
        with self.assertRaisesRegex(ev.SanityCheckError, "exceeds eps"):
            ev.sanity_check("linf", x, (x + 2 * eps).clamp(0, 1), norm="linf", eps=eps)
        d = torch.zeros_like(x)
        d[:, 0, 0, :3] = 4.0 / 3 * 0.1                   # l1 = 0.4 per image
        self.assertLess(abs(ev.sanity_check("l1", x, x + d, norm="l1", eps=0.4)["max_pert"] - 0.4), 1e-6)
        with self.assertRaisesRegex(ev.SanityCheckError, "exceeds eps"):
            ev.sanity_check("l1", x, x + d, norm="l1", eps=0.3)
        with self.assertRaisesRegex(ev.SanityCheckError, "exceeds eps"):
            ev.sanity_check("l2", x, x + d, norm="l2", eps=0.1)
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        with self.assertRaisesRegex(ev.SanityCheckError, "NaN"):
            ev.sanity_check("fog", x, bad)
        with self.assertRaisesRegex(ev.SanityCheckError, r"outside \[0, 1\]"):
            ev.sanity_check("fog", x, x + 0.5)
        with self.assertRaisesRegex(ev.SanityCheckError, "shape"):
            ev.sanity_check("fog", x, x[:2])

    def test_broken_attack_fails_the_run(self):
        """A deliberately broken l_inf attack (twice the budget) stops the evaluation with SanityCheckError."""
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
        x_u8, y = ev.fake_split(8, 0)
        broken = lambda m, x, yb: (x + 16 / 255).clamp(0, 1)
        with self.assertRaises(ev.SanityCheckError):
            ev.run_job(model, x_u8, y, broken, "linf", "linf", 8 / 255, 4, 0, 8)

    def test_classwise_errors_hand_computed(self):
        """Eqs. (45)-(48) on a scripted table: 3 classes present out of 4 (class 3 has no example)."""
        y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
        clean = torch.tensor([1, 1, 1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
        adv = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool)   # index 3: clean wrong, adv right
        m = ev.classwise_json(y, clean, adv, num_classes=4)
        # per class: nat = (1/4, 1/2, 0); rob (clean wrong counts) = (3/4, 1/2, 2/4); bdy = (1/2, 0, 1/2)
        expected = {"avg_nat": (0.25 + 0.5 + 0) / 3, "worst_nat": 0.5, "avg_rob": (0.75 + 0.5 + 0.5) / 3,
                    "worst_rob": 0.75, "avg_bdy": (0.5 + 0 + 0.5) / 3, "worst_bdy": 0.5}
        for k, v in expected.items():
            self.assertAlmostEqual(m[k], v, msg=k)
        self.assertAlmostEqual(m["avg_bdy"], m["avg_rob"] - m["avg_nat"])
        self.assertNotAlmostEqual(m["worst_bdy"], m["worst_rob"] - m["worst_nat"])   # max_i(rob-nat), not a difference
        self.assertEqual(m["classes"], 3)
        self.assertEqual(m["nat_per_class"], [0.25, 0.5, 0.0, None])
        self.assertEqual(m["rob_per_class"], [0.75, 0.5, 0.5, None])

    def test_levels(self):
        kw = ev.eval_kwargs("fog", "cifar10", "high", {})
        self.assertEqual(kw, attacks.fog.__globals__["LEVELS"]["high"])
        self.assertEqual(ev.eval_kwargs("fog", "cifar10", "low", {"fog": 0.7})["eps"], 0.7)     # --eps-table wins
        quick = ev.eval_kwargs("fog", "cifar10", "medium", {}, steps=4)
        self.assertEqual(quick["steps"], 4)
        self.assertAlmostEqual(quick["step_size"], min(40 * 0.05 / 4, 0.4))   # same reach, capped at eps (README D8)
        self.assertEqual(ev.eval_kwargs("l1", "cifar10", "high", {}), {"eps": 12.0, "steps": 100, "sparsity": 0.2})
        # attacks registered later: a module without LEVELS (defaults = medium only) and one lacking a level
        no_levels = types.ModuleType("fake_no_levels")
        some_levels = types.ModuleType("fake_some_levels")
        some_levels.LEVELS = {"medium": {"eps": 0.1, "steps": 5, "step_size": 0.02}}
        try:
            for mod in (no_levels, some_levels):
                sys.modules[mod.__name__] = mod
                fn = lambda model, x, y, *, eps=0.1, steps=5, step_size=0.02: x
                fn.__module__ = mod.__name__
                attacks.ATTACKS[mod.__name__] = fn
            self.assertEqual(ev.eval_kwargs("fake_no_levels", "cifar10", "medium", {}),
                             {"eps": 0.1, "steps": 5, "step_size": 0.02})
            with self.assertRaisesRegex(ValueError, "defines no LEVELS"):
                ev.eval_kwargs("fake_no_levels", "cifar10", "high", {})
            with self.assertRaisesRegex(ValueError, r"LEVELS has only \['medium'\]"):
                ev.eval_kwargs("fake_some_levels", "cifar10", "low", {})
        finally:
            for mod in (no_levels, some_levels):
                attacks.ATTACKS.pop(mod.__name__, None)
                sys.modules.pop(mod.__name__, None)

    def test_eps_table_validation(self):
        with tempfile.TemporaryDirectory() as d:
            good, bad = Path(d) / "good.json", Path(d) / "bad.json"
            good.write_text(json.dumps({"eps": {"fog": 0.3, "snow": 2}}))
            self.assertEqual(ev.load_eps_table(str(good)), {"fog": 0.3, "snow": 2.0})
            bad.write_text(json.dumps({"nosuch": 0.3}))
            with self.assertRaisesRegex(ValueError, "registered attacks"):
                ev.load_eps_table(str(bad))
            bad.write_text(json.dumps({"fog": -1}))
            with self.assertRaisesRegex(ValueError, "finite numbers >= 0"):
                ev.load_eps_table(str(bad))


if __name__ == "__main__":
    unittest.main()
