"""The attack contract (attacks/__init__.py docstring), checked for EVERY name registered in attacks.ATTACKS.

Each attack added to the registry is checked here automatically. Run: python -m pytest -q tests/test_attacks.py
"""

import inspect
import unittest

import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
from attacks import ATTACKS
from attacks._common import lp_norm, project_l1_box

LP_NORM = {"linf": float("inf"), "l2": 2, "l1": 1}
# a small eps for every attack: non-trivial, but keeps the checks cheap
TEST_STEPS = 2


class TinyCNN(nn.Module):
    """A fixed tiny CNN with BN (so eval/train mode matters) and a `features` method (for ppgd's 'self')."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.linear = nn.Linear(16, num_classes)

    def features(self, x):
        f1 = F.relu(self.bn1(self.conv1(x)))
        f2 = F.relu(self.conv2(f1))
        return [f1, f2]

    def forward(self, x):
        return self.linear(self.features(x)[-1].mean((2, 3)))


def make_model(seed=0, train_mode=False):
    torch.manual_seed(seed)
    model = TinyCNN()
    with torch.no_grad():   # give BN non-trivial running stats
        model.train()
        model(torch.rand(16, 3, 32, 32))
    model.train(train_mode)
    return model


def make_batch(b=3, hw=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, hw, hw, generator=g)
    x[0, :, :2, :2] = 0.0   # exact box corners so clamping paths are exercised
    x[1, :, -2:, -2:] = 1.0
    y = torch.randint(0, 10, (b,), generator=g)
    return x, y


def run(name, model, x, y, **kw):
    kw.setdefault("steps", TEST_STEPS)
    return ATTACKS[name](model, x, y, **kw)


class TestContract(unittest.TestCase):
    def test_registry_names(self):
        self.assertTrue(set(ATTACKS) <= set(attacks.ALL), set(ATTACKS) - set(attacks.ALL))
        self.assertEqual(len(attacks.ALL), 21)
        self.assertEqual(len(attacks.SEMANTIC), 17)
        self.assertEqual(set(attacks.LP + attacks.PERCEPTUAL + attacks.SEMANTIC), set(attacks.ALL))
        for name in attacks.LP:
            self.assertIn(name, ATTACKS)
        for name, fn in ATTACKS.items():
            with self.subTest(attack=name):
                self.assertEqual(fn.__name__, name)
                params = inspect.signature(fn).parameters
                for kw in ("eps", "steps"):
                    self.assertEqual(params[kw].kind, inspect.Parameter.KEYWORD_ONLY, f"{name}: {kw}")

    def test_output_contract(self):
        """Shape/dtype/device, [0,1], finite, detached; mode, grads and inputs untouched; seeded."""
        for name in ATTACKS:
            for train_mode, hw in ((False, 32), (True, 32), (False, 28)):
                with self.subTest(attack=name, train_mode=train_mode, hw=hw):
                    model = make_model(train_mode=train_mode)
                    x, y = make_batch(hw=hw)
                    x0, y0 = x.clone(), y.clone()
                    torch.manual_seed(123)
                    out = run(name, model, x, y)
                    self.assertEqual(out.shape, x.shape)
                    self.assertEqual(out.dtype, x.dtype)
                    self.assertEqual(out.device, x.device)
                    self.assertFalse(out.requires_grad)
                    self.assertTrue(torch.isfinite(out).all())
                    self.assertGreaterEqual(out.min().item(), 0.0)
                    self.assertLessEqual(out.max().item(), 1.0)
                    self.assertEqual(model.training, train_mode)
                    self.assertTrue(all(p.grad is None for p in model.parameters()), "parameter .grad written")
                    self.assertTrue(torch.equal(x, x0) and torch.equal(y, y0), "inputs mutated")
                    self.assertFalse(x.requires_grad)
                    torch.manual_seed(123)
                    again = run(name, model, x, y)
                    self.assertTrue(torch.equal(out, again), "same seed must give the same output")

    def test_attack_changes_input(self):
        model = make_model()
        x, y = make_batch()
        for name in ATTACKS:
            with self.subTest(attack=name):
                torch.manual_seed(0)
                out = run(name, model, x, y)
                self.assertGreater((out - x).abs().max().item(), 1e-4, "default attack left x unchanged")

    def test_eps_zero_is_identity(self):
        model = make_model()
        x, y = make_batch()
        for name in ATTACKS:
            with self.subTest(attack=name):
                torch.manual_seed(0)
                out = run(name, model, x, y, eps=0.0)
                self.assertLessEqual((out - x).abs().max().item(), 1e-6)

    def test_generator_controls_randomness(self):
        model = make_model()
        x, y = make_batch()
        for name in ATTACKS:
            if "generator" not in inspect.signature(ATTACKS[name]).parameters:
                continue
            with self.subTest(attack=name):
                a = run(name, model, x, y, generator=torch.Generator().manual_seed(5))
                torch.manual_seed(999)   # the global RNG must not matter when a generator is given
                b = run(name, model, x, y, generator=torch.Generator().manual_seed(5))
                self.assertTrue(torch.equal(a, b))


class TestLp(unittest.TestCase):
    def test_budget_per_sample_eps_and_direction(self):
        model = make_model()
        x, y = make_batch(b=4)
        eps_default = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}
        for name, p in LP_NORM.items():
            e = eps_default[name]
            for eps in (e, torch.tensor([e, e / 2, 0.0, 2 * e])):
                for direction in (1, -1, torch.tensor([1.0, -1.0, 1.0, -1.0])):
                    for loss in ("ce", "kl"):
                        with self.subTest(attack=name, eps=eps, direction=direction, loss=loss):
                            out = run(name, model, x, y, eps=eps, direction=direction, loss=loss, steps=3)
                            bound = eps if isinstance(eps, torch.Tensor) else torch.full((4,), e)
                            norms = lp_norm(out - x, p)
                            self.assertTrue((norms <= bound * (1 + 1e-5) + 1e-6).all(), (norms, bound))
                            if isinstance(eps, torch.Tensor):
                                self.assertLessEqual((out[2] - x[2]).abs().max().item(), 1e-6)

    def test_direction_moves_loss(self):
        """direction=+1 raises the loss above clean, direction=-1 lowers it below clean."""
        model = make_model()
        x, y = make_batch(b=16, seed=3)
        with torch.no_grad():
            clean = F.cross_entropy(model(x), y, reduction="none")
        for name in LP_NORM:
            with self.subTest(attack=name):
                up = run(name, model, x, y, direction=1, steps=5)
                down = run(name, model, x, y, direction=-1, steps=5)
                with torch.no_grad():
                    l_up = F.cross_entropy(model(up), y, reduction="none")
                    l_down = F.cross_entropy(model(down), y, reduction="none")
                self.assertGreater(l_up.mean().item(), clean.mean().item())
                self.assertLess(l_down.mean().item(), clean.mean().item())

    def test_bad_arguments(self):
        model = make_model()
        x, y = make_batch()
        for name in LP_NORM:
            with self.subTest(attack=name):
                with self.assertRaisesRegex(ValueError, "init"):
                    run(name, model, x, y, init="gaussian")
                with self.assertRaisesRegex(ValueError, "loss"):
                    run(name, model, x, y, loss="mse")
                with self.assertRaisesRegex(ValueError, "eps"):
                    run(name, model, x, y, eps=-1.0)
                with self.assertRaisesRegex(ValueError, r"\[0, 1\]"):
                    run(name, model, x * 2 + 0.5, y)

    def test_registered_rejects_unknown_names(self):
        with self.assertRaisesRegex(ValueError, "registered attacks: linf"):
            attacks.registered("linf,nope")
        self.assertEqual(attacks.registered("l2, linf"), ["l2", "linf"])


class TestLinfClosedForm(unittest.TestCase):
    def test_one_step_linf_on_linear_model_is_fgsm(self):
        """One zero-init step of size eps on a linear model equals x + eps*sign(w_y' - w_y) (y' the other class)."""
        torch.manual_seed(0)
        lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
        x = 0.25 + 0.5 * torch.rand(5, 3, 8, 8)   # away from the box so clamping does not bind
        y = torch.randint(0, 2, (5,))
        eps = 0.1
        out = ATTACKS["linf"](lin, x, y, eps=eps, steps=1, step_size=eps, init="zero")
        w = lin[1].weight.detach()                                # (2, d)
        # CE gradient w.r.t. x of a 2-class linear model has the sign of (w_other - w_y)
        expected = x + eps * torch.sign(w[1 - y] - w[y]).view_as(x)
        self.assertTrue(torch.allclose(out, expected, atol=1e-6))


class TestL1Projection(unittest.TestCase):
    def test_projection_is_feasible_optimal_and_idempotent(self):
        """Compare with scipy's constrained solver on small problems, check both constraints and idempotence."""
        import numpy as np
        from scipy.optimize import minimize

        g = torch.Generator().manual_seed(0)
        for trial in range(6):
            d = 12
            x = torch.rand(1, 1, 1, d, generator=g, dtype=torch.float64)
            z = 1.5 * torch.randn(1, 1, 1, d, generator=g, dtype=torch.float64)
            eps = torch.tensor([0.2 + trial * 0.5], dtype=torch.float64).view(1, 1, 1, 1)
            p = project_l1_box(x, z, eps)
            self.assertLessEqual(p.abs().sum().item(), eps.item() + 1e-9)
            self.assertTrue(((x + p) >= -1e-12).all() and ((x + p) <= 1 + 1e-12).all())
            self.assertTrue(torch.allclose(project_l1_box(x, p, eps), p, atol=1e-10))
            # reference: min ||d - z||^2 s.t. ||d||_1 <= eps, -x <= d <= 1 - x, via split d = a - b, a, b >= 0
            zn, xn = z.flatten().numpy(), x.flatten().numpy()
            fun = lambda v: np.sum((v[:d] - v[d:] - zn) ** 2)
            cons = [{"type": "ineq", "fun": lambda v: eps.item() - v.sum()},
                    {"type": "ineq", "fun": lambda v: v[:d] - v[d:] + xn},
                    {"type": "ineq", "fun": lambda v: 1 - xn - (v[:d] - v[d:])}]
            res = minimize(fun, np.zeros(2 * d), bounds=[(0, None)] * (2 * d), constraints=cons, method="SLSQP",
                           options={"ftol": 1e-12, "maxiter": 500})
            ref = res.x[:d] - res.x[d:]
            self.assertLess(np.abs(ref - p.flatten().numpy()).max(), 1e-4, f"trial {trial}")


if __name__ == "__main__":
    unittest.main()
