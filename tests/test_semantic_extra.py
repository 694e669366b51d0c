"""Properties specific to the nine extra unforeseen attacks, one test class per attack, plus the registry.

The shared contract (shape, range, eps = 0, side effects, seeding) is checked for every registered attack by
tests/test_attacks.py; here each attack's own render/constraint is checked. Run:
    python -m pytest -q tests/test_semantic_extra.py
"""

import unittest

import torch
import torch.nn as nn

import attacks
from attacks import ATTACKS
import torch.nn.functional as F

from attacks._common import gaussian_blur, identity_grid, reference_grid
from attacks._edges import canny_edges
from attacks.fog import diamond_square, fog_levels
from attacks.hsv import hsv_to_rgb, rgb_to_hsv
from attacks.klotski import block_flow
from attacks.polkadot import blend_dots, dot_profiles
from attacks.prison import bar_mask
from attacks.whirlpool import swirl_displacement

EXTRA = ("blur", "edge", "fog", "texture", "prison", "whirlpool", "polkadot", "klotski", "hsv")
CORE = ("wood", "elastic", "pixel", "snow", "gabor", "jpeg", "glitch", "kaleidoscope")


class TinyNet(nn.Module):
    """A small fixed conv net (no BN) so the attacks have a real gradient to follow."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.linear = nn.Linear(8, 10)

    def forward(self, x):
        return self.linear(torch.relu(self.conv(x)).mean((2, 3)))


def batch(b=4, hw=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, hw, hw, generator=g), torch.randint(0, 10, (b,), generator=g)


def step_image(b=2, hw=32, col=16):
    """Left half dark, right half bright: one vertical edge."""
    x = torch.full((b, 3, hw, hw), 0.2)
    x[..., col:] = 0.8
    return x


class TestRegistry(unittest.TestCase):
    def test_semantic_names_and_registry(self):
        """SEMANTIC is exactly the 17 names; once registered all are in ATTACKS; ATTACKS is LP + SEMANTIC (+ ppgd)."""
        self.assertEqual(set(attacks.SEMANTIC), set(CORE + EXTRA))
        self.assertEqual(len(attacks.SEMANTIC), 17)
        for name in attacks.SEMANTIC:
            with self.subTest(attack=name):
                self.assertIn(name, ATTACKS)
                self.assertEqual(ATTACKS[name].__name__, name)
        self.assertTrue(set(ATTACKS) <= set(attacks.ALL), set(ATTACKS) - set(attacks.ALL))
        for name in ("linf", "l2", "l1"):
            self.assertIn(name, ATTACKS)
        expected = set(attacks.LP) | set(attacks.SEMANTIC) | ({"ppgd"} if "ppgd" in ATTACKS else set())
        self.assertEqual(set(ATTACKS), expected)

    def test_levels_and_defaults(self):
        """Each extra module exports LEVELS low/medium/high; the function defaults are the medium level."""
        import importlib
        for name in EXTRA:
            with self.subTest(attack=name):
                module = importlib.import_module(f"attacks.{name}")
                self.assertEqual(set(module.LEVELS), {"low", "medium", "high"})
                defaults = ATTACKS[name].__kwdefaults__
                for key, value in module.LEVELS["medium"].items():
                    self.assertEqual(defaults[key], value, key)
                self.assertLess(module.LEVELS["low"]["eps"], module.LEVELS["medium"]["eps"])
                self.assertLess(module.LEVELS["medium"]["eps"], module.LEVELS["high"]["eps"])

    def test_per_sample_eps_zero_leaves_that_sample(self):
        """eps as a (B,) tensor: the sample with eps 0 is returned unchanged, the others are attacked."""
        model = TinyNet()
        x, y = batch(b=3)
        for name in EXTRA:
            with self.subTest(attack=name):
                e = ATTACKS[name].__kwdefaults__["eps"]
                out = ATTACKS[name](model, x, y, eps=torch.tensor([e, 0.0, e / 2]), steps=2,
                                    generator=torch.Generator().manual_seed(0))
                self.assertLessEqual((out[1] - x[1]).abs().max().item(), 1e-6)
                self.assertGreater((out[0] - x[0]).abs().max().item(), 1e-3)


class TestEdges(unittest.TestCase):
    def test_mask_binary_thin_and_without_gradient(self):
        x = step_image().requires_grad_(True)
        mask = canny_edges(x)
        self.assertEqual(tuple(mask.shape), (2, 1, 32, 32))
        self.assertFalse(mask.requires_grad)
        self.assertTrue(torch.all((mask == 0) | (mask == 1)))
        # away from the frame (zero padding, as the reference, makes the frame an edge): a thin line at the step
        cols = mask[0, 0, 2:-2, 2:-2].sum(0).nonzero().flatten().add(2).tolist()
        self.assertTrue(set(cols) <= {15, 16} and cols, cols)
        self.assertTrue(torch.all(mask[0, 0, 2:-2, 2:-2].sum(1) == 1))   # one pixel per row
        flat = canny_edges(torch.full((1, 3, 32, 32), 0.3))[0, 0]
        self.assertEqual(flat[2:-2, 2:-2].sum().item(), 0)               # flat: edges on the frame only
        self.assertGreater(flat.sum().item(), 0)
        self.assertEqual(canny_edges(torch.zeros(1, 3, 32, 32)).sum().item(), 0)   # black: none (peak 0)


class TestBlur(unittest.TestCase):
    def test_output_between_image_and_blurred_image(self):
        """x_adv - x = m~ (blur(x) - x) with m~ in [0, eps]: same sign, at most eps of the way."""
        x, y = batch()
        eps = 0.3
        out = ATTACKS["blur"](TinyNet(), x, y, eps=eps, steps=3)
        full = gaussian_blur(x, 25.0, 8) - x
        moved = out - x
        self.assertTrue(torch.all(moved * full >= -1e-7))
        self.assertTrue(torch.all(moved.abs() <= eps * full.abs() + 1e-6))


class TestEdge(unittest.TestCase):
    def test_only_edges_change_and_stay_near_grey(self):
        x = step_image()
        x = x + 0.05 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
        y = torch.tensor([1, 2])
        eps = 0.1
        out = ATTACKS["edge"](TinyNet(), x, y, eps=eps, steps=3)
        mask = canny_edges(x).expand_as(x).bool()
        self.assertTrue(mask.any())
        self.assertTrue(torch.equal(out[~mask], x[~mask]))
        self.assertTrue(torch.all((out[mask] - 0.5).abs() <= eps + 1e-6))


class TestFog(unittest.TestCase):
    def test_map_shape_range_and_zero(self):
        levels = fog_levels(32, 32)
        self.assertEqual(levels, 5)
        n = sum(4 ** i for i in range(levels))
        self.assertEqual(3 * n, 1023)                                     # values per image (attacks/fog.py docstring)
        eps = 0.4
        v = (2 * torch.rand(2, 3, n, generator=torch.Generator().manual_seed(0)) - 1) * eps
        fog_map = diamond_square(v, levels)
        self.assertEqual(tuple(fog_map.shape), (2, 32, 32))
        # each level adds at most w_i eps to a mean of earlier values: |map| <= eps * sum_i 3^-i < 1.5 eps
        self.assertLessEqual(fog_map.abs().max().item(), 1.5 * eps)
        self.assertGreater(fog_map.std().item(), 0.01)
        self.assertEqual(diamond_square(torch.zeros(1, 3, n), levels).abs().max().item(), 0.0)
        # wrap-around: every value depends on its neighbours across the border, so the gradient of a corner reaches
        # the opposite edge of the map
        v.requires_grad_(True)
        (grad,) = torch.autograd.grad(diamond_square(v, levels)[:, 0, -1].sum(), [v])
        self.assertGreater(grad.abs().sum().item(), 0)
        self.assertEqual(fog_levels(28, 28), 5)                           # padded to 32, then centre-cropped

    def test_output_is_blend_toward_fog_colour(self):
        x, y = batch(hw=28)
        out = ATTACKS["fog"](TinyNet(), x, y, steps=2)
        colour = torch.tensor([0.485, 0.45, 0.406]).view(1, 3, 1, 1)
        t = (out - x) / (colour - x)                                      # the fog fraction, same for all channels
        ok = (colour - x).abs() > 0.05
        self.assertTrue(torch.all((t[ok] >= -1e-4) & (t[ok] <= 1 + 1e-4)))


class TestTexture(unittest.TestCase):
    def test_edges_black_and_rest_whitened_by_at_most_eps(self):
        x = step_image()
        y = torch.tensor([3, 4])
        eps = 0.1
        out = ATTACKS["texture"](TinyNet(), x, y, eps=eps, steps=3)
        mask = canny_edges(x).expand_as(x).bool()
        self.assertTrue(torch.all(out[mask] == 0))
        rest = ~mask
        moved = out[rest] - x[rest]
        self.assertTrue(torch.all(moved >= 0))                            # only towards white
        self.assertTrue(torch.all(moved <= eps * (1 - x[rest]) + 1e-6))


class TestPrison(unittest.TestCase):
    def test_bars_where_the_reference_puts_them(self):
        cols = bar_mask(32, 32)[0, 0, 0].nonzero().flatten().tolist()
        self.assertEqual(cols, [2, 6, 10, 14, 18, 22, 26])               # 7 one-pixel bars on CIFAR
        x, y = batch()
        eps = 0.03
        out = ATTACKS["prison"](TinyNet(), x, y, eps=eps, steps=3)
        bars = bar_mask(32, 32).expand_as(x).bool()
        self.assertTrue(torch.equal(out[~bars], x[~bars]))
        self.assertTrue(torch.all((out[bars] >= 0.5) & (out[bars] <= 0.5 + eps + 1e-6)))


class TestWhirlpool(unittest.TestCase):
    def test_zero_strength_is_zero_displacement_and_max_combination(self):
        grid = identity_grid(2, 32, 32)
        centres = torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
        zero = swirl_displacement(grid, centres, torch.zeros(2, 3), min_strength=0.0)
        self.assertEqual(zero.abs().max().item(), 0.0)
        s = torch.tensor([[5.0, 20.0, 1.0], [0.0, 3.0, 50.0]])
        both = swirl_displacement(grid, centres, s)
        single = torch.stack([swirl_displacement(grid, centres[:, k:k + 1], s[:, k:k + 1]) for k in range(3)])
        self.assertTrue(torch.allclose(both, single.amax(0)))             # elementwise max over whirlpools
        # a swirl is a rotation about its centre: |p + Delta - c| = |p - c| for a single whirlpool
        one = swirl_displacement(grid, centres[:, :1], s[:, :1])
        r0 = (grid - centres[:, None, None, 0]).norm(dim=-1)
        r1 = (grid + one - centres[:, None, None, 0]).norm(dim=-1)
        self.assertTrue(torch.allclose(r0, r1, atol=1e-5))


class TestPolkadot(unittest.TestCase):
    def test_zero_strength_is_identity_and_strong_dot_takes_its_colour(self):
        x, _ = batch(b=2)
        centres = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
        profiles = dot_profiles(32, 32, centres)
        colours = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]).expand(2, 2, 3)
        same = blend_dots(x, torch.zeros(2, 2), profiles, colours)
        self.assertLessEqual((same - x).abs().max().item(), 1e-6)
        strong = blend_dots(x, torch.tensor([[3.0, 0.0], [3.0, 0.0]]), profiles, colours)
        self.assertTrue(torch.allclose(strong[:, :, 16, 16], torch.tensor([1.0, 0.0, 0.0]).expand(2, 3), atol=1e-4))
        self.assertLessEqual((strong[:, :, 0, 31] - x[:, :, 0, 31]).abs().max().item(), 1e-2)   # far away
        self.assertTrue(torch.all(profiles >= 0))


class TestKlotski(unittest.TestCase):
    def test_block_flow_and_one_pixel_shift(self):
        t = torch.zeros(1, 8, 8, 2)
        self.assertEqual(block_flow(t, 32, 32).abs().max().item(), 0.0)
        t[0, 2, 3, 0] = 2.0 / 32                                          # block (2, 3) samples one pixel to the right
        flow = block_flow(t, 32, 32)
        self.assertEqual(int((flow[0, ..., 0] != 0).sum()), 16)           # exactly its 4 x 4 pixels
        self.assertTrue(torch.all(flow[0, 8:12, 12:16, 0] == 2.0 / 32))
        x, _ = batch(b=1)
        # the reference's grid (2j/W - 1, align_corners=False) reads (i - 1/2, j - 1/2): a 2x2 average
        out = F.grid_sample(x, reference_grid(1, 32, 32) + flow, padding_mode="zeros", align_corners=False)
        avg = lambda r, c: x[0, :, r - 1:r + 1, c - 1:c + 1].mean((1, 2))
        self.assertTrue(torch.allclose(out[0, :, 5, 7], avg(5, 7), atol=1e-6))
        self.assertTrue(torch.allclose(out[0, :, 9, 13], avg(9, 14), atol=1e-6))   # block (2, 3): one px right
        self.assertTrue(torch.allclose(out[0, :, 0, 0], x[0, :, 0, 0] / 4, atol=1e-6))   # corner: 3/4 padding


class TestHSV(unittest.TestCase):
    def test_round_trip_exact_and_no_gradient_through_rgb_to_hsv(self):
        x, _ = batch(b=2)
        x[0, :, 0, :4] = torch.tensor([0.5, 0.0, 1.0]).view(3, 1)        # grey, black, white pixels
        x[1, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])                     # pure red (hue 0)
        x[1, :, 0, 1] = torch.tensor([1.0, 0.0, 1e-7])                    # red, hue just below 1
        x.requires_grad_(True)
        hsv = rgb_to_hsv(x)
        self.assertFalse(hsv.requires_grad)
        self.assertTrue(torch.all((hsv >= 0) & (hsv <= 1)))
        self.assertLessEqual((hsv_to_rgb(hsv) - x).abs().max().item(), 1e-6)
        # hue 1 is hue 0 (sector 5 -> 0 is continuous)
        one, zero = torch.tensor([1.0, 0.7, 0.9]), torch.tensor([0.0, 0.7, 0.9])
        pair = hsv_to_rgb(torch.stack([one, zero]).view(2, 3, 1, 1))
        self.assertTrue(torch.allclose(pair[0], pair[1], atol=1e-6))
        # the 6 sector formula against colorsys for a spread of hues
        import colorsys
        hs = torch.linspace(0, 0.999, 37)
        got = hsv_to_rgb(torch.stack([hs, torch.full_like(hs, 0.6), torch.full_like(hs, 0.8)]).view(1, 3, 1, -1))
        want = torch.tensor([colorsys.hsv_to_rgb(h.item(), 0.6, 0.8) for h in hs]).T.reshape(1, 3, 1, -1)
        self.assertTrue(torch.allclose(got, want, atol=1e-6))


if __name__ == "__main__":
    unittest.main()
