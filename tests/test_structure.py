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

    def test_comments_cite_only_what_users_have(self):
        """Code and README cite the papers, the README and public URLs: never the developers' notes or issues."""
        # (written with character classes so that this line does not match itself)
        bad = re.compile(r"sp[e]c |cas[.]md|caat[.]md|referenc[e] [A-Z0-9\u00a7]|[(]issue [0-9]+[)]|[.][.]/shared"
                         r"|shar[e]d/|\u00a7")
        files = [ROOT / "README.md"] + sorted(ROOT.glob("*.py")) + sorted((ROOT / "attacks").glob("*.py")) \
            + sorted((ROOT / "tests").glob("*.py"))
        hits = [f"{p.name}:{i}: {line.strip()[:80]}" for p in files
                for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
        self.assertEqual(hits, [])

    def test_cas_deviations_and_readme_details(self):
        """Every departure from the paper is marked at its line, and every README D<n> the code cites exists."""
        code, readme = (ROOT / "cas.py").read_text(), (ROOT / "README.md").read_text()
        self.assertGreaterEqual(code.count("# DEVIATION:"), 7)
        for n in sorted(set(re.findall(r"\bD(\d+)\b", code)), key=int):
            self.assertIn(f"**D{n} ", readme, f"cas.py cites README D{n}, which the README does not define")

    def test_every_cited_readme_detail_exists(self):
        """Every "README D<n>" that any script or attack module cites is defined in the README (as **D<n> ...)."""
        readme = (ROOT / "README.md").read_text()
        for p in sorted(ROOT.glob("*.py")) + sorted((ROOT / "attacks").glob("*.py")):
            for n in sorted(set(re.findall(r"README D(\d+)", p.read_text())), key=int):
                with self.subTest(file=p.name, detail=n):
                    self.assertIn(f"**D{n} ", readme, f"{p.name} cites README D{n}, which the README does not define")

    def test_caat_deviations_are_marked(self):
        for name in ("caat_meta.py", "caat_reinforce.py"):
            with self.subTest(script=name):
                self.assertGreaterEqual((ROOT / name).read_text().count("# DEVIATION"), 2)

    def test_readme_attack_table_matches_registry(self):
        readme = (ROOT / "README.md").read_text()
        section = readme.split("<!-- attack-table -->")[1].split("<!-- /attack-table -->")[0]
        names = re.findall(r"^\| `(\w+)` \|", section, re.M)
        self.assertEqual(sorted(names), sorted(attacks.ATTACKS), "README attack table drifted from ATTACKS")


if __name__ == "__main__":
    unittest.main()
