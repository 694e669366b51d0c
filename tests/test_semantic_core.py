"""One property specific to each of the eight core unforeseen attacks, plus the `python -m attacks` CLI.

The shared contract (shape, [0,1], eps = 0 identity, no side effects, seeding) is tests/test_attacks.py; here each
attack's own rendering / constraint is checked. Latents seen during the PGD loop are recorded by wrapping the
module's `render` (unittest.mock.patch.object), so the constraint is checked on the real attack run.
Run: python -m pytest -q tests/test_semantic_core.py
"""

import contextlib
import importlib
import io
import math
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn

from attacks import ATTACKS

CORE = ("wood", "elastic", "pixel", "snow", "gabor", "jpeg", "glitch", "kaleidoscope")
# the modules (attacks/__init__ binds each name to its function, so `from attacks import wood` is the function)
MODULES = {name: importlib.import_module(f"attacks.{name}") for name in CORE}
wood, elastic, pixel, snow, gabor, jpeg, glitch, kaleidoscope = (MODULES[name] for name in CORE)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(128, 10)).eval()


def batch(b=4, hw=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, hw, hw, generator=g), torch.randint(0, 10, (b,), generator=g)


def ramp(b=4, hw=32):
    """x[..., i, j] = 0.1 + 0.02 j + 0.005 i: bilinear sampling of it is exact inside the image."""
    i, j = torch.meshgrid(torch.arange(hw), torch.arange(hw), indexing="ij")
    return (0.1 + 0.02 * j + 0.005 * i).float().expand(b, 3, hw, hw).clone()


def record_latents(module, arg_index=1):
    """Patch module.render so that every latent it is called with is recorded (detached copies)."""
    seen, original = [], module.render

    def wrapper(*args, **kwargs):
        seen.append(args[arg_index].detach().clone())
        return original(*args, **kwargs)
    return mock.patch.object(module, "render", wrapper), seen


class TestLevels(unittest.TestCase):
    def test_levels_table_and_defaults(self):
        """LEVELS has low/medium/high; the signature defaults are the medium level; eps grows with the level."""
        import inspect
        for name in CORE:
            with self.subTest(attack=name):
                levels = MODULES[name].LEVELS
                self.assertEqual(set(levels), {"low", "medium", "high"})
                params = inspect.signature(ATTACKS[name]).parameters
                for key in ("eps", "steps", "step_size"):
                    self.assertAlmostEqual(params[key].default, levels["medium"][key])
                self.assertLess(levels["low"]["eps"], levels["medium"]["eps"])
                self.assertLess(levels["medium"]["eps"], levels["high"]["eps"])


class TestWood(unittest.TestCase):
    def test_rings_only_darken_and_noise_stays_in_box(self):
        x, y = batch()
        zero = torch.zeros(4, 1, 16, 16)
        out = wood.render(x, zero, num_rings=5, normalizing_constant=8.0)
        self.assertTrue((out <= x + 1e-7).all())                      # a multiplicative mask in [0, 1]
        r = wood.ring_radius(32, 32)
        expected = x * torch.sin(math.pi * 5 * r).abs() ** (1 / 8)
        self.assertLess((out - expected).abs().max().item(), 0.06)    # the sin guard: |s|^(1/8) >= 0.056
        patch, seen = record_latents(wood)
        with patch:
            wood.wood(tiny_model(), x, y, steps=5, step_size=0.02, eps=0.05)
        self.assertEqual(seen[0].abs().max().item(), 0.0)             # zero init
        self.assertTrue(all(n.abs().max() <= 0.05 + 1e-7 for n in seen))
        self.assertGreater(seen[-1].abs().max().item(), 0.049)        # the large steps reach the box edge


class TestElastic(unittest.TestCase):
    def test_reference_grid_convention_and_units(self):
        """As the reference: pixel (i, j) reads x at (i W / (W - 1) - 1/2, j W / (W - 1) - 1/2) + the flow in pixels
        (W / 2 per grid unit): a zero flow zooms out by W / (W - 1), the frame half blended with black."""
        for hw in (32, 28):
            x = ramp(hw=hw)
            at = lambda i, j: 0.1 + 0.02 * j + 0.005 * i
            p = torch.arange(hw) * hw / (hw - 1) - 0.5
            for shift_px in (0.0, 1.0):
                flow = torch.zeros(4, 2, hw // 2, hw // 2)
                flow[:, 0] = shift_px * 2.0 / hw
                out = elastic.render(x, flow)
                inner = slice(1, hw - 2)
                want = at(p[inner, None], p[None, inner] + shift_px).float()
                self.assertLess((out[:, :, inner, inner] - want).abs().max().item(), 1e-5)
            self.assertLess((elastic.render(x, torch.zeros(4, 2, hw // 2, hw // 2))[..., 0, 0] - x[..., 0, 0] / 4)
                            .abs().max().item(), 1e-6)                # corner: a quarter of the pixel, rest black

    def test_flow_on_the_l2_sphere(self):
        x, y = batch()
        patch, seen = record_latents(elastic)
        with patch:
            elastic.elastic(tiny_model(), x, y, steps=3, eps=torch.tensor([0.1, 0.25, 0.5, 0.25]))
        bound = torch.tensor([0.1, 0.25, 0.5, 0.25])
        for f in seen:
            self.assertTrue((f.flatten(1).norm(dim=1) <= bound * (1 + 1e-5)).all())
        self.assertTrue(torch.allclose(seen[0].flatten(1).norm(dim=1), bound, rtol=1e-5))   # init norm = eps


class TestPixel(unittest.TestCase):
    def test_weights_in_unit_box_and_output_between_x_and_block_corner(self):
        x, y = batch()
        patch, seen = record_latents(pixel)
        with patch:
            out = pixel.pixel(tiny_model(), x, y, steps=4, eps=10.0, step_size=3.0)
        for p in seen:
            self.assertGreaterEqual(p.min().item(), 0.0)
            self.assertLessEqual(p.max().item(), 1.0)
            self.assertTrue((p.flatten(1).norm(dim=1) <= 10.0 * (1 + 1e-5)).all())
        corner = pixel.upsample_blocks(x[:, :, ::4, ::4], 4, 32, 32)
        lo, hi = torch.minimum(x, corner), torch.maximum(x, corner)
        self.assertTrue(((out >= lo - 1e-6) & (out <= hi + 1e-6)).all())
        full = pixel.render(x, torch.ones(4, 3, 8, 8), pixel_size=4)   # weight 1 = constant 4 x 4 blocks
        self.assertTrue(torch.equal(full, corner))


class TestSnow(unittest.TestCase):
    def test_intensities_inside_l2_ball_and_only_on_flakes(self):
        x, y = batch()
        patch, seen = record_latents(snow)
        with patch:
            out = snow.snow(tiny_model(), x, y, steps=4, eps=4.0, step_size=1.0)
        for s in seen:
            self.assertTrue((s.flatten(1).norm(dim=1) <= 4.0 * (1 + 1e-5)).all())
        support = seen[0] != 0
        self.assertTrue(all(((s != 0) <= support).all() for s in seen))   # masked entries never move
        density = support.float().mean().item()
        self.assertTrue(0.003 < density < 0.02, density)                  # Bernoulli(1 / 10^2)
        # snow only brightens the wintery image
        self.assertTrue((out >= snow.discolour(x, 0.15).clamp(0, 1) - 1e-6).all())

    def test_cifar_kernels_are_3x3_diagonal_streaks(self):
        k = snow.flake_kernels(64, 5, 3, 1, device="cpu", dtype=torch.float32,
                               generator=torch.Generator().manual_seed(0))
        self.assertEqual(tuple(k.shape), (64, 5, 3, 3))
        self.assertTrue(torch.all(k[:, :, 1, 1] == 1))                    # centre on the streak
        main = (k[..., 0, 0] == 1) & (k[..., 2, 2] == 1)                  # "\" streak
        anti = (k[..., 0, 2] == 1) & (k[..., 2, 0] == 1)                  # "/" streak (flipped image)
        self.assertTrue(torch.all(main | anti))
        self.assertTrue(torch.all(main.all(1) | anti.all(1)))            # one orientation per image
        self.assertTrue(main.any() and anti.any())
        ones = (k == 1).flatten(2).sum(2)                                 # width 1: 3 ones, width 3 / 5: 7 ones
        self.assertTrue(((ones == 3) | (ones == 7)).all())
        corners = torch.where(main, k[..., 0, 2] + k[..., 2, 0], k[..., 0, 0] + k[..., 2, 2])
        self.assertTrue((corners == 0).all())                             # the two far corners stay dark
        thin = ones == 3
        self.assertTrue(torch.allclose(k[thin][:, 1, 0], torch.tensor(1 - 0.5 ** 0.5)))   # anti-aliased side taps
        blurred = snow.flake_kernels(4, 2, 7, 3, device="cpu", dtype=torch.float32)   # the ImageNet-style path
        self.assertEqual(tuple(blurred.shape), (4, 2, 7, 7))


class TestGabor(unittest.TestCase):
    def test_impulse_gives_the_kernel_and_values_stay_in_box(self):
        kernel = gabor.draw_kernel(23, 3, 3.0, device="cpu", dtype=torch.float32,
                                   generator=torch.Generator().manual_seed(0))
        self.assertTrue(torch.allclose(kernel, kernel.flip(0, 1), atol=1e-6))   # cos-based kernel: point-symmetric
        x = torch.full((1, 3, 64, 64), 0.5)
        values = torch.zeros_like(x)
        values[0, 1, 32, 32] = 0.01
        out = gabor.render(x, values, torch.ones_like(x), kernel)
        self.assertTrue(torch.allclose(out[0, 1, 21:44, 21:44] - 0.5, 0.01 * kernel, atol=1e-6))
        self.assertEqual((out[0, 0] - 0.5).abs().max().item(), 0.0)             # other channels untouched
        xb, y = batch()
        patch, seen = record_latents(gabor)
        with patch:
            gabor.gabor(tiny_model(), xb, y, steps=3, eps=0.03)
        support = seen[0] != 0
        self.assertTrue(all(g.abs().max() <= 0.03 + 1e-7 and ((g != 0) <= support).all() for g in seen))
        self.assertTrue(0.07 < support.float().mean().item() < 0.13)             # density 0.1

    def test_kernel_redrawn_every_pass_as_the_reference(self):
        xb, y = batch()
        with mock.patch.object(gabor, "draw_kernel", wraps=gabor.draw_kernel) as spy:
            gabor.gabor(tiny_model(), xb, y, steps=3)                            # the reference's behaviour
        self.assertEqual(spy.call_count, 4)                                      # 3 steps + the final image
        with mock.patch.object(gabor, "draw_kernel", wraps=gabor.draw_kernel) as spy:
            gabor.gabor(tiny_model(), xb, y, steps=3, redraw_kernel=False)       # opt-in: one kernel per call
        self.assertEqual(spy.call_count, 1)


class TestJpeg(unittest.TestCase):
    def test_dct_round_trip_exact_and_dc_offset(self):
        d = jpeg.dct_matrix(dtype=torch.float32)
        self.assertTrue(torch.allclose(d @ d.T, torch.eye(8), atol=1e-6))       # orthonormal DCT-II
        for hw in (32, 28):
            x, _ = batch(hw=hw)
            n = -(-hw // 8)
            q = torch.zeros(4, 3, n, n, 8, 8)
            self.assertLessEqual((jpeg.render(x, q) - x).abs().max().item(), 1e-6)
        # +q on the DC coefficient of Y raises every pixel of that 8 x 8 block by q / 8 on R, G and B
        x = torch.full((1, 3, 16, 16), 0.5)
        q = torch.zeros(1, 3, 2, 2, 8, 8)
        q[0, 0, 1, 0, 0, 0] = 0.04
        delta = jpeg.render(x, q) - x
        self.assertTrue(torch.allclose(delta[:, :, 8:, :8], torch.full((1, 3, 8, 8), 0.005), atol=1e-6))
        self.assertLess(delta[:, :, :8].abs().max().item(), 1e-6)

    def test_coefficients_stay_in_box(self):
        x, y = batch()
        patch, seen = record_latents(jpeg)
        with patch:
            jpeg.jpeg(tiny_model(), x, y, steps=3)
        self.assertTrue(seen[0].min() >= 0)                                      # one-sided U[0, eps] init
        self.assertTrue(all(q.abs().max() <= 3 / 255 + 1e-7 for q in seen))


class TestGlitch(unittest.TestCase):
    def test_reference_half_pixel_grid_and_one_pixel_shift(self):
        """As the reference: pixel (i, j) reads x at (i - 1/2, j - 1/2 + shift in pixels), W / 2 px per grid unit."""
        x = ramp()
        at = lambda i, j: 0.1 + 0.02 * j + 0.005 * i
        v = torch.zeros(4, 3, 16)
        v[:, 1, 3] = 2.0 / 32                    # channel G, band 3 (rows 6-7): exactly one pixel
        out = glitch.render(x, v)
        i, j = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        want = at(i - 0.5, j - 0.5).expand(4, 3, 32, 32).clone()
        want[:, 1, 6:8] = at(i[6:8] - 0.5, j[6:8] + 0.5)
        self.assertLess((out[..., 1:, 1:-1] - want[..., 1:, 1:-1]).abs().max().item(), 1e-5)
        x, y = batch()
        for eps in (0.0, torch.tensor([0.0, 0.05, 0.0, 0.05])):   # eps = 0: x itself, not the half-pixel render
            out = glitch.glitch(tiny_model(), x, y, steps=2, eps=eps)
            self.assertTrue(torch.equal(out[0], x[0]) and torch.equal(out[2], x[2]))

    def test_shifts_stay_in_box(self):
        x, y = batch()
        patch, seen = record_latents(glitch)
        with patch:
            glitch.glitch(tiny_model(), x, y, steps=3, eps=0.05)
        self.assertTrue(all(v.abs().max() <= 0.05 + 1e-7 for v in seen))


class TestKaleidoscope(unittest.TestCase):
    def test_shapes_and_outlines_only(self):
        x, y = batch(b=6)
        g = torch.Generator().manual_seed(0)
        out = kaleidoscope.kaleidoscope(tiny_model(), x, y, steps=3, generator=g)
        g = torch.Generator().manual_seed(0)   # the same draws as inside the attack: the shapes come first
        masks = kaleidoscope.shape_masks(6, 5, 32, 32, 4.0, device="cpu", dtype=torch.float32, generator=g)
        edges = kaleidoscope.edge_rings(masks, 5)
        untouched = (masks.amax(1, keepdim=True) == 0) & (edges == 0)
        self.assertTrue(torch.equal(out * untouched, x * untouched))            # outside shapes: x exactly
        on_edge = (edges > 0).expand_as(out)
        self.assertLessEqual(out[on_edge].max().item(), 0.1 + 1e-6)              # outlines: brightness <= eps
        self.assertTrue(torch.equal(out[:, 0:1][edges > 0], out[:, 2:3][edges > 0]))   # grey outlines

    def test_rasterised_areas(self):
        g = torch.Generator().manual_seed(1)
        masks = kaleidoscope.shape_masks(200, 1, 64, 64, 8.0, device="cpu", dtype=torch.float32, generator=g)
        kind = torch.randint(0, 3, (200, 1, 1, 1), generator=torch.Generator().manual_seed(1)).flatten()
        inside = (masks.flatten(1) > 0).sum(1).float()
        centred = inside > 0
        edge = math.floor(kaleidoscope.TRIANGLE_SCALE * 8)
        expected = {0: math.pi * 16, 1: math.sqrt(3) / 4 * edge ** 2, 2: 64.0}
        for k, area in expected.items():                                         # shapes near the border are cut
            a = inside[(kind == k) & centred].median().item()
            self.assertLess(abs(a - area) / area, 0.2, (k, a, area))


def run_cli(argv):
    """(return code, stdout) of `python -m attacks ARGV`, run in-process."""
    from attacks import __main__ as cli
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(cli.get_args(argv))
    return rc, out.getvalue()


class TestCli(unittest.TestCase):
    def test_list_fits_100_columns_and_names_every_attack(self):
        rc, text = run_cli(["--list"])
        self.assertEqual(rc, 0)
        lines = text.splitlines()
        self.assertTrue(all(len(line) <= 100 for line in lines), max(lines, key=len))
        table = lines[2:lines.index("")]
        rows = {line.split("|")[0].strip(): line for line in table}
        self.assertEqual(list(rows), list(ATTACKS))
        self.assertIn("| 1/255, 3/255, 6/255", rows["jpeg"])            # jpeg's levels, unambiguous
        self.assertIn("| 0.03, 0.05, 0.1", rows["wood"])
        bounds = lines[lines.index("what eps bounds:") + 1:]
        self.assertEqual([line.split()[0] for line in bounds if not line.startswith(" ")], list(ATTACKS))
        self.assertIn("LPIPS", next(line for line in bounds if line.startswith("ppgd ")))

    def test_list_time_fits_100_columns(self):
        """--time adds two columns; the lines still fit (timing itself mocked: only the layout is checked)."""
        from attacks import __main__ as cli
        with mock.patch.object(cli, "time_per_step", return_value=0.0123):
            rc, text = run_cli(["--list", "--time", "--batch-size", "2", "--device", "cpu"])
        self.assertEqual(rc, 0)
        self.assertTrue(all(len(line) <= 100 for line in text.splitlines()), text)
        self.assertIn("x linf", text.splitlines()[0])

    def test_gallery_default_attacks_labels_and_progress(self):
        """The default set (every attack, ppgd included) on the tiny model: a labelled PNG, one printed row each."""
        from PIL import Image
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "g.png"
            rc, text = run_cli(["--gallery", str(path), "--n-images", "2", "--scale", "1", "--device", "cpu"])
            self.assertEqual(rc, 0)
            self.assertEqual(path.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
            with Image.open(path) as im:
                width, height = im.size
        self.assertEqual(height, 2 + (len(ATTACKS) + 1) * (32 + 2))            # make_grid: one row per attack
        self.assertGreater(width, 2 + 2 * (32 + 2))                               # + the label margin on the left
        for i, name in enumerate(["clean"] + list(ATTACKS)):
            self.assertRegex(text, rf"row {i:2d}: {name} .*accuracy on these images \d\.\d\d")
        self.assertRegex(text, r"row  4: ppgd +\d+\.\d s ")                     # seconds per attack

    def test_gallery_plain_state_dict_and_input_norm(self):
        """--ckpt with a plain state_dict of eval.py's PreActResNet-18 (width 8): --input-norm none, ppgd included;
        the default for a plain state_dict is the dataset's mean/std (as eval.py), for our model.pt its metadata."""
        from attacks import __main__ as cli
        ev = importlib.import_module("eval")
        torch.manual_seed(0)
        net = ev.PreActResNet18(width=8).eval()
        with tempfile.TemporaryDirectory() as tmp:
            sd, png = Path(tmp) / "sd.pt", Path(tmp) / "g.png"
            torch.save(net.state_dict(), sd)
            rc, text = run_cli(["--gallery", str(png), "--ckpt", str(sd), "--input-norm", "none", "--attacks",
                                "linf,ppgd", "--n-images", "2", "--scale", "1", "--device", "cpu"])
            self.assertEqual(rc, 0)
            self.assertTrue(png.is_file())
            self.assertIn("input normalisation: none", text)
            self.assertRegex(text, r"row  2: ppgd .*accuracy on these images")
            mean, std, how = cli.input_normalisation(sd)                          # default, plain state_dict
            self.assertEqual((mean, std), (ev.DATASETS["cifar10"]["mean"], ev.DATASETS["cifar10"]["std"]))
            torch.save({"model": net.state_dict(), "arch": "preact_resnet18", "mean": [0.5] * 3, "std": [0.25] * 3},
                       Path(tmp) / "model.pt")
            mean, std, how = cli.input_normalisation(Path(tmp) / "model.pt")      # metadata: build reads it
            self.assertEqual((mean, std), (None, None))
            self.assertIn("metadata", how)
            self.assertEqual(cli.input_normalisation(Path(tmp) / "model.pt", "none")[:2], ((0.0,) * 3, (1.0,) * 3))
        self.assertEqual(run_cli(["--gallery", "x.png", "--input-norm", "none"])[0], 2)   # no --ckpt: refused

    def test_gallery_hints_at_input_norm_on_low_clean_accuracy(self):
        from attacks import __main__ as cli
        ev = importlib.import_module("eval")
        x, y = batch(b=2)
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(ev.PreActResNet18(width=8).state_dict(), Path(tmp) / "sd.pt")
            model = cli.load_model(Path(tmp) / "sd.pt")                          # mean / std None: [0, 1] input
            with torch.no_grad():
                y = (model(x).argmax(1) + 1) % 10                                 # every clean prediction wrong
            with mock.patch.object(cli, "load_cifar_test", return_value=(x, y)):
                rc, text = run_cli(["--gallery", str(Path(tmp) / "g.png"), "--ckpt", str(Path(tmp) / "sd.pt"),
                                    "--input-norm", "none", "--data-dir", "unused", "--attacks", "jpeg",
                                    "--n-images", "2", "--scale", "1", "--device", "cpu"])
        self.assertEqual(rc, 0)
        self.assertIn("low clean accuracy", text)
        self.assertIn("--input-norm dataset / none", text)

    def test_ckpt_loader_matches_the_scripts_model(self):
        """attacks/__main__.load_model rebuilds the same network as the scripts' shared model block."""
        try:
            import cas
        except ImportError as e:   # the training script is not there yet
            self.skipTest(f"cas.py not importable: {e}")
        from attacks import __main__ as cli
        torch.manual_seed(0)
        net = cas.build_model(10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), width=8).eval()
        with torch.no_grad():
            for m in net.modules():   # non-trivial BN statistics
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
        meta = {"format": 1, "model": net.state_dict(), "arch": "preact_resnet18", "width": 8, "num_classes": 10,
                "activation": "relu", "dataset": "cifar10", "mean": [0.4914, 0.4822, 0.4465],
                "std": [0.2471, 0.2435, 0.2616]}
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(meta, Path(tmp) / "model.pt")
            ours = cli.load_model(Path(tmp) / "model.pt")
            torch.save({"module." + k: v for k, v in net.state_dict().items()}, Path(tmp) / "sd.pt")
            plain = cli.load_model(Path(tmp) / "sd.pt", mean=meta["mean"], std=meta["std"])   # width from shapes
        x, _ = batch()
        with torch.no_grad():
            self.assertTrue(torch.allclose(ours(x), net(x), atol=1e-5))
            self.assertTrue(torch.allclose(plain(x), net(x), atol=1e-5))


if __name__ == "__main__":
    unittest.main()
