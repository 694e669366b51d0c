"""tests/gpu_check.py on the CPU at toy sizes: the one-call GPU check must itself run before anyone needs it."""

import json
import tempfile
import unittest
from pathlib import Path

import pytest
import torch

import cas
from tests import gpu_check


class TestGpuCheck(unittest.TestCase):
    def test_contract_holds_in_fp32_and_bf16(self):
        model = cas.build_model(10, (0.5,) * 3, (0.25,) * 3, 8).eval()
        for bf16 in (False, True):
            self.assertEqual(gpu_check.contract(model, torch.device("cpu"), bf16), {}, f"bf16={bf16}")

    @pytest.mark.slow
    def test_quick_run_on_cpu(self):
        """Every section runs; the contract, the scripts and bf16-vs-fp32 pass (the bench's targets are GPU-sized)."""
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "check.json"
            gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
            table = json.loads(out.read_text())["table"]
        self.assertEqual([r[0] for r in table][:9], ["contract"] * 2 + ["scripts"] * 6 + ["bf16"])
        self.assertEqual([r[0] for r in table][9:], ["bench"] * 4)
        for section, what, ok, detail, _ in table[:9]:
            self.assertTrue(ok, f"{section} {what}: {detail}")


if __name__ == "__main__":
    unittest.main()
