"""Every script answers --help quickly (no import-time work) and every flag is typed (TRADES #31)."""

import argparse
import importlib
import subprocess
import sys
import unittest
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [p.stem for p in sorted(ROOT.glob("*.py")) if p.stem in ("cas", "caat_meta", "caat_reinforce", "eval")]
TYPELESS_OK = (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction,
               argparse.BooleanOptionalAction, argparse._VersionAction)


@pytest.mark.slow
class TestCli(unittest.TestCase):
    def test_help(self):
        for name in SCRIPTS:
            with self.subTest(script=name):
                proc = subprocess.run([sys.executable, str(ROOT / f"{name}.py"), "--help"], capture_output=True,
                                      text=True, cwd=ROOT, timeout=120)
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertIn("--dataset", proc.stdout)

    def test_every_flag_has_a_type(self):
        for name in SCRIPTS:
            module = importlib.import_module(name)
            parser = module.make_parser()
            for action in parser._actions:
                with self.subTest(script=name, flag=action.option_strings):
                    self.assertTrue(isinstance(action, TYPELESS_OK) or action.type is not None,
                                    f"{action.option_strings} has no type=")

    def test_scripts_import_without_side_effects(self):
        """Importing a script (as tests and users of `from cas import CASSampler` do) must not run it."""
        proc = subprocess.run([sys.executable, "-c", "import cas; print('ok')"], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        self.assertEqual(proc.stdout.strip(), "ok", proc.stderr)


if __name__ == "__main__":
    unittest.main()
