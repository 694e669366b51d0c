"""Layout rules: scripts import no other script; attacks/ imports only stdlib, torch, numpy, scipy and itself;
the README's attack table names exactly the registered attacks."""

import ast
import re
import sys
import unittest
from pathlib import Path

import attacks

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"cas.py", "caat_meta.py", "caat_reinforce.py", "eval.py", "theory.py", "attacks", "tests",
             "requirements.txt", "README.md"}
SCRIPT_MODULES = {"cas", "caat_meta", "caat_reinforce", "eval", "theory"}
ATTACK_DEPS = {"torch", "numpy", "scipy", "attacks"}


def imported_roots(path):
    tree = ast.parse(Path(path).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


class TestStructure(unittest.TestCase):
    def test_top_level_is_exactly_the_layout(self):
        tracked = {p.name for p in ROOT.iterdir() if not p.name.startswith(".") and p.name not in
                   ("runs", "data", "__pycache__")}
        self.assertEqual(tracked - TOP_LEVEL, set(), "unexpected top-level entries")

    def test_scripts_do_not_import_each_other(self):
        for script in sorted(SCRIPT_MODULES):
            path = ROOT / f"{script}.py"
            if path.exists():
                with self.subTest(script=script):
                    self.assertEqual(imported_roots(path) & (SCRIPT_MODULES - {script}), set())

    def test_attacks_import_only_allowed_packages(self):
        stdlib = set(sys.stdlib_module_names)
        for path in sorted((ROOT / "attacks").glob("*.py")):
            if path.name == "__main__.py":   # the `python -m attacks` CLI (not an attack) writes PNGs with torchvision
                continue
            with self.subTest(module=path.name):
                bad = {r for r in imported_roots(path) if r not in stdlib and r not in ATTACK_DEPS}
                self.assertEqual(bad, set(), f"{path.name} imports {bad}")

    def test_readme_attack_table_matches_registry(self):
        readme = (ROOT / "README.md").read_text()
        section = readme.split("<!-- attack-table -->")[1].split("<!-- /attack-table -->")[0]
        names = re.findall(r"^\| `(\w+)` \|", section, re.M)
        self.assertEqual(sorted(names), sorted(attacks.ATTACKS), "README attack table drifted from ATTACKS")


if __name__ == "__main__":
    unittest.main()
