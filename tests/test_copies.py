"""The deliberately duplicated blocks (# ==== BEGIN/END SHARED: <name> ====) are byte-identical in every script.

    python tests/test_copies.py --fix     # rewrite every copy from the canonical file (the first one listed)
"""

import difflib
import re
import sys
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["cas.py", "caat_meta.py", "caat_reinforce.py"]
ALL4 = SCRIPTS + ["eval.py"]
BLOCKS = {   # block -> files holding an identical copy; the first is canonical. Scripts not written yet are skipped.
    "common-flags": SCRIPTS, "run-dir": SCRIPTS,
    "setup": ALL4, "distributed": ALL4, "data-parallel": SCRIPTS,
    "model": ALL4, "data": ALL4, "evaluate": ALL4, "io": ALL4,
    "cas-metrics": ["cas.py", "eval.py"],
    "caat-characteristics": ["caat_meta.py", "caat_reinforce.py"],
    "caat-scenarios": ["caat_meta.py", "caat_reinforce.py"],
    "caat-metrics": ["caat_meta.py", "caat_reinforce.py"], "caat-classwise": ["caat_meta.py", "caat_reinforce.py", "eval.py"],
    "caat-flags": ["caat_meta.py", "caat_reinforce.py"],
    "caat-fairness": ["caat_meta.py", "caat_reinforce.py"], "caat-run": ["caat_meta.py", "caat_reinforce.py"],
}
MARK = re.compile(r"^# ==== (BEGIN|END) SHARED: ([\w-]+)[^\n]*\n", re.M)


def blocks(text):
    """{name: body} of every shared block in text; raises on unbalanced, nested or repeated markers."""
    found, open_name, start = {}, None, 0
    for m in MARK.finditer(text):
        kind, name = m.groups()
        if kind == "BEGIN":
            if open_name is not None:
                raise ValueError(f"BEGIN {name} inside open block {open_name}")
            open_name, start = name, m.end()
        else:
            if name != open_name:
                raise ValueError(f"END {name} does not close {open_name}")
            if name in found:
                raise ValueError(f"block {name} appears twice")
            found[name], open_name = text[start:m.start()], None
    if open_name is not None:
        raise ValueError(f"block {open_name} is never closed")
    return found


def existing(files):
    return [f for f in files if (ROOT / f).exists()]


class TestCopies(unittest.TestCase):
    def test_canonical_files_hold_their_blocks(self):
        self.assertTrue((ROOT / "cas.py").exists())
        for name, files in BLOCKS.items():
            present = existing(files)
            if present:
                with self.subTest(block=name):
                    self.assertEqual(present[0], files[0], f"canonical {files[0]} missing while copies exist")
                    self.assertIn(name, blocks((ROOT / files[0]).read_text()))

    def test_copies_identical(self):
        for name, files in BLOCKS.items():
            present = existing(files)
            for f in present[1:]:
                with self.subTest(block=name, file=f):
                    ref = blocks((ROOT / present[0]).read_text())[name]
                    got = blocks((ROOT / f).read_text()).get(name)
                    self.assertIsNotNone(got, f"{f} lacks the shared block {name}")
                    self.assertEqual(got, ref, "".join(difflib.unified_diff(
                        ref.splitlines(True), got.splitlines(True), present[0], f)))

    def test_every_marker_is_registered(self):
        for f in existing(ALL4):
            with self.subTest(file=f):
                for name in blocks((ROOT / f).read_text()):
                    self.assertIn(name, BLOCKS, f"{f}: unknown shared block {name}")
                    self.assertIn(f, BLOCKS[name], f"{f} holds block {name} but is not listed for it")

    def test_no_dead_code_in_copies(self):
        """Every function or class a shared block defines is used by every file that holds the block."""
        for f in existing(ALL4):
            text = (ROOT / f).read_text()
            for name, body in blocks(text).items():
                for fn in re.findall(r"^(?:def|class) (\w+)", body, re.M) + re.findall(r"^([A-Z_]+) = ", body, re.M):
                    with self.subTest(file=f, block=name, name=fn):
                        uses = len(re.findall(rf"\b{fn}\b", text)) - 1   # minus the definition
                        self.assertGreater(uses, 0, f"{f}: {fn} (shared block {name}) is never used")

    def test_marker_parser_catches_drift(self):
        """The checker itself can fail: unbalanced markers raise, a one-character change shows up as a diff."""
        with self.assertRaises(ValueError):
            blocks("# ==== BEGIN SHARED: io ====\nx = 1\n")
        a = blocks("# ==== BEGIN SHARED: io ====\nx = 1\n# ==== END SHARED: io ====\n")["io"]
        b = blocks("# ==== BEGIN SHARED: io ====\nx = 2\n# ==== END SHARED: io ====\n")["io"]
        self.assertNotEqual(a, b)


def fix():
    """Rewrite each copy's block body from the canonical file."""
    for name, files in BLOCKS.items():
        present = existing(files)
        if len(present) < 2:
            continue
        ref = blocks((ROOT / present[0]).read_text())[name]
        for f in present[1:]:
            text = (ROOT / f).read_text()
            spans = {m.group(2) + m.group(1): m for m in MARK.finditer(text)}
            if name + "BEGIN" in spans:
                b, e = spans[name + "BEGIN"].end(), spans[name + "END"].start()
                (ROOT / f).write_text(text[:b] + ref + text[e:])
                print(f"{f}: {name} rewritten from {present[0]}")


if __name__ == "__main__":
    if "--fix" in sys.argv:
        fix()
    else:
        unittest.main()
