"""CIFAR-10, CIFAR-100 and SVHN read from tiny files written in the official layouts (no network, no real data):
the shared data block unit-checked through cas, then every script run end to end on those files."""

import argparse
import json
import pickle
import shutil
import tempfile
import unittest
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

import cas
from tests.test_scripts import run_script

TMP = DATA = None
C100_TRAIN, C100_TEST = 200, 20   # 2 train images per class: the CAAT scripts keep 1 per class for their meta set
SVHN_TRAIN, SVHN_TEST = 30, 20
TINY = ["--device", "cpu", "--width", "8", "--epochs", "1", "--max-steps", "1", "--batch-size", "16",
        "--attack-steps", "1", "--eval-examples", "8", "--attacks", "linf"]


def images(n, seed):
    """(n, 3, 32, 32) uint8 with two pixels set by hand: channel 0 at (0, 1) = 7, channel 2 at (31, 0) = 200."""
    x = np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    x[:, 0, 0, 1], x[:, 2, 31, 0] = 7, 200
    return x


def cifar_rows(x):
    """Official CIFAR rows: 1024 R, then 1024 G, then 1024 B values, each plane row-major."""
    rows = np.concatenate([x[:, c].reshape(len(x), 1024) for c in range(3)], axis=1)
    assert rows[0, 1] == 7 and rows[0, 2048 + 31 * 32] == 200
    return rows


def dump(path, d):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(d, fh, protocol=2)


def c100_labels(n):
    return [int(v) for v in (np.arange(n) * 37 + 99) % 100]   # starts at 99; each class twice in 200 images


def write_cifar100(root):
    for split, n, seed in (("train", C100_TRAIN, 1), ("test", C100_TEST, 2)):
        fine = c100_labels(n)
        dump(root / "cifar-100-python" / split, {
            b"data": cifar_rows(images(n, seed)), b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
            b"filenames": [b"img_%d.png" % i for i in range(n)], b"batch_label": b"%s batch 1 of 1" % split.encode()})


def write_cifar10(root):
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        dump(root / "cifar-10-batches-py" / name, {
            b"data": cifar_rows(images(4, 10 + i)), b"labels": [(4 * i + j) % 10 for j in range(4)],
            b"filenames": [b"x.png"] * 4, b"batch_label": name.encode()})


def write_svhn(root):
    for split, n, seed in (("train", SVHN_TRAIN, 3), ("test", SVHN_TEST, 4)):
        x = images(n, seed)
        x[3, 2, 5, 9] = 201   # not symmetric in (row, col): catches a transposed image
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)   # 1..10, 10 = digit 0
        savemat(str(root / f"{split}_32x32.mat"), {"X": np.ascontiguousarray(x.transpose(2, 3, 1, 0)), "y": y})


def setUpModule():
    global TMP, DATA
    TMP = Path(tempfile.mkdtemp(prefix="cas_datasets_"))
    DATA = TMP / "data"
    DATA.mkdir()
    for write in (write_cifar100, write_cifar10, write_svhn):
        write(DATA)


def tearDownModule():
    shutil.rmtree(TMP, ignore_errors=True)


def data_args(dataset, data_dir):
    return argparse.Namespace(dataset=dataset, data_dir=str(data_dir), download=False, train_subset=0, test_subset=0,
                              input_norm="dataset")


class TestReader(unittest.TestCase):
    def check_images(self, x, n, seed):
        self.assertEqual((x.dtype, tuple(x.shape)), (torch.uint8, (n, 3, 32, 32)))
        self.assertEqual(int(x[0, 0, 0, 1]), 7, "channel 0, pixel (0, 1)")
        self.assertEqual(int(x[0, 2, 31, 0]), 200, "channel 2, pixel (31, 0)")
        if seed is not None:
            self.assertTrue(torch.equal(x, torch.from_numpy(images(n, seed))))

    def test_cifar100_pixels_and_fine_labels(self):
        for train, n, seed in ((True, C100_TRAIN, 1), (False, C100_TEST, 2)):
            x, y = cas.read_split("cifar100", DATA, train)
            self.check_images(x, n, seed)
            self.assertEqual(y.dtype, torch.int64)
            self.assertEqual(y.tolist(), c100_labels(n), "CIFAR-100 must use fine_labels (0..99), not coarse_labels")
            self.assertEqual(int(y.max()), 99)

    def test_cifar10_batches_in_order(self):
        x, y = cas.read_split("cifar10", DATA, True)
        expect = np.concatenate([images(4, 10 + i) for i in range(5)])
        self.assertTrue(torch.equal(x, torch.from_numpy(expect)))
        self.assertEqual(y.tolist(), [k % 10 for k in range(20)])
        x, y = cas.read_split("cifar10", DATA, False)
        self.check_images(x, 4, 15)
        self.assertEqual(y.tolist(), [0, 1, 2, 3])

    def test_svhn_transpose_and_label_10_is_digit_0(self):
        for train, n, seed in ((True, SVHN_TRAIN, 3), (False, SVHN_TEST, 4)):
            x, y = cas.read_split("svhn", DATA, train)
            self.check_images(x, n, None)
            self.assertEqual(int(x[3, 2, 5, 9]), 201, "SVHN X[row, col, channel, n] -> x[n, channel, row, col]")
            expect = torch.from_numpy(images(n, seed))
            expect[3, 2, 5, 9] = 201
            self.assertTrue(torch.equal(x, expect))
            self.assertEqual(y.dtype, torch.int64)
            self.assertEqual(y.tolist(), [(i % 10 + 1) % 10 for i in range(n)], "label 10 must become 0")

    def test_make_datasets_cifar100_has_100_classes_and_model_100_outputs(self):
        data = cas.make_datasets(data_args("cifar100", DATA), torch.device("cpu"))
        self.assertEqual(data["num_classes"], 100)
        self.assertEqual(tuple(data["mean"]), cas.DATASETS["cifar100"]["mean"])
        self.assertEqual((len(data["train_y"]), len(data["test_y"])), (C100_TRAIN, C100_TEST))
        model = cas.build_model(data["num_classes"], data["mean"], data["std"], width=8).eval()
        xb, yb = next(cas.iterate_batches(data["test_x"], data["test_y"], 4))
        with torch.no_grad():
            self.assertEqual(tuple(model(xb).shape), (4, 100))
        self.assertEqual(yb.tolist(), c100_labels(4))
        svhn = cas.make_datasets(data_args("svhn", DATA), torch.device("cpu"))
        self.assertEqual((svhn["num_classes"], svhn["augment"]), (10, "crop"))

    def test_missing_files_without_download(self):
        empty = TMP / "empty"
        empty.mkdir(exist_ok=True)
        for name, first in (("cifar100", "cifar-100-python/train"), ("svhn", "train_32x32.mat"),
                            ("cifar10", "cifar-10-batches-py/data_batch_1")):
            with self.assertRaises(FileNotFoundError) as cm:
                cas.make_datasets(data_args(name, empty), torch.device("cpu"))
            self.assertIn(first, str(cm.exception))
        half = TMP / "half"
        half.mkdir(exist_ok=True)
        shutil.copy(DATA / "train_32x32.mat", half)
        with self.assertRaises(FileNotFoundError) as cm:
            cas.make_datasets(data_args("svhn", half), torch.device("cpu"))
        self.assertIn("missing test_32x32.mat", str(cm.exception))


@pytest.mark.slow
class TestScriptsOnFiles(unittest.TestCase):
    def check_run(self, out, dataset, num_classes):
        self.assertTrue((out / "results.json").is_file())
        self.assertEqual(json.loads((out / "args.json").read_text())["dataset"], dataset)
        model = torch.load(out / "model.pt", weights_only=True)
        self.assertEqual(model["num_classes"], num_classes, f"{dataset} model.pt num_classes")
        self.assertEqual(tuple(model["model"]["linear.weight"].shape)[0], num_classes)

    def test_cas_cifar100_then_eval(self):
        out = TMP / "cas_c100"
        run_script("cas.py", "--dataset", "cifar100", "--data-dir", DATA, "--no-download", *TINY,
                   "--eval-attack-steps", "1", "--pretrain-epochs", "0", "--out-dir", out)
        self.check_run(out, "cifar100", 100)
        res = out / "eval.json"
        run_script("eval.py", "--ckpt", out / "model.pt", "--dataset", "cifar100", "--data-dir", DATA, "--no-download",
                   "--n-examples", "8", "--attacks", "linf", "--steps", "1", "--caat-pgd", "", "--device", "cpu",
                   "--out", res)
        ev = json.loads(res.read_text())
        self.assertEqual(ev["model"]["num_classes"], 100)

    def test_cas_svhn(self):
        out = TMP / "cas_svhn"
        run_script("cas.py", "--dataset", "svhn", "--data-dir", DATA, "--no-download", *TINY,
                   "--eval-attack-steps", "1", "--pretrain-epochs", "0", "--out-dir", out)
        self.check_run(out, "svhn", 10)

    def test_caat_reinforce_cifar100(self):
        # one CAAT script: caat_meta.py shares the data and meta-split blocks byte for byte (test_copies.py), and its
        # fairness_metrics make a 1-step cifar100 run cost 10-20 s on 2 cores
        out = TMP / "caat_reinforce"
        run_script("caat_reinforce.py", "--dataset", "cifar100", "--data-dir", DATA, "--no-download", *TINY,
                   "--meta-per-class", "1", "--eval-pgd-steps", "1", "--val-attack-steps", "1", "--out-dir", out)
        self.check_run(out, "cifar100", 100)

    def test_cli_missing_files(self):
        proc = run_script("cas.py", "--dataset", "cifar100", "--data-dir", TMP / "nothing", "--no-download", *TINY,
                          "--pretrain-epochs", "0", "--out-dir", TMP / "cas_missing", expect=None)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("cifar-100-python/train", proc.stdout + proc.stderr)


if __name__ == "__main__":
    unittest.main()
