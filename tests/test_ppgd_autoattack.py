"""Tests for AutoAttack (attacks/autoattack.py + _apgd/_fab/_square) and PPGD (attacks/perceptual.py).

Tiny models, 16x16 images and reduced iteration counts (n_iter / n_queries / steps) keep this file fast on CPU.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_ppgd_autoattack.py
"""

import unittest
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
from attacks import _apgd, _fab, perceptual
from attacks._common import lp_norm
from attacks.autoattack import VERSIONS, accept_adversarial, autoattack, run_component
from attacks.perceptual import feature_fn, hooked_features, lpips_distance, ppgd

P = {"linf": "inf", "l2": 2, "l1": 1}
EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}
FAST = {"n_iter": 8, "n_queries": 30}
COMPONENTS = VERSIONS["standard"]


class SmallNet(nn.Module):
    """conv(s2) -> relu -> conv(s2) -> relu -> linear on the flattened map (no pooling, so l_p attacks can win)."""

    def __init__(self, num_classes=10, hw=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * (hw // 4) ** 2, num_classes)

    def features(self, x):
        a = F.relu(self.c1(x - 0.5))
        return [a, F.relu(self.c2(a))]

    def forward(self, x):
        return self.fc(self.features(x)[-1].flatten(1))


class FixedFeatures(nn.Module):
    """A separate fixed feature network for ppgd's lpips_net (returns a list of maps)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.c = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        f = self.c(x)
        return [f, F.avg_pool2d(F.relu(f), 2)]


class Recorder(nn.Module):
    """Wraps a model and records the batch size of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.model(x)


def make_data(b=8, hw=16, seed=1, model=None, n_wrong=2):
    """Random images labelled with the model's prediction, except the first n_wrong points (misclassified)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, hw, hw, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:n_wrong] = (y[:n_wrong] + 1) % model.fc.out_features
    return x, y


class TestComponents(unittest.TestCase):
    def setUp(self):
        self.model = SmallNet().eval()
        self.x, self.y = make_data(model=self.model)

    def test_budget_box_and_todo(self):
        """Each component, each norm: candidates in the box and the eps-ball; points outside `todo` untouched and
        never forwarded (every forward pass holds at most todo.sum() images)."""
        todo = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
        for norm in P:
            for name in COMPONENTS:
                with self.subTest(norm=norm, component=name):
                    rec = Recorder(self.model)
                    cand, broken = run_component(name, rec, self.x, self.y, todo, norm=norm, eps=EPS[norm], **FAST)
                    self.assertLessEqual(max(rec.sizes), int(todo.sum()))
                    self.assertFalse(broken[~todo].any())
                    self.assertTrue(torch.equal(cand[~todo], self.x[~todo]))
                    self.assertGreaterEqual(cand.min().item(), 0.0)
                    self.assertLessEqual(cand.max().item(), 1.0)
                    norms = lp_norm(cand - self.x, P[norm])
                    self.assertTrue((norms <= EPS[norm] * (1 + 1e-5) + 1e-6).all(), norms)
                    if broken.any():   # a reported point is really adversarial
                        self.assertTrue(accept_adversarial(self.model, self.x[broken], self.y[broken],
                                                           cand[broken], norm=norm, eps=EPS[norm]).all())

    def test_components_break_points(self):
        """Sanity: with a larger budget every component breaks at least one correctly classified point."""
        todo = torch.ones(8, dtype=torch.bool)
        todo[:2] = False
        big = {"linf": 0.1, "l2": 2.0, "l1": 20.0}
        for norm in P:
            for name in COMPONENTS:
                with self.subTest(norm=norm, component=name):
                    kw = dict(FAST, n_queries=300)
                    _, broken = run_component(name, self.model, self.x, self.y, todo, norm=norm, eps=big[norm], **kw)
                    self.assertTrue(broken.any())

    def test_same_seed_same_result(self):
        todo = torch.ones(8, dtype=torch.bool)
        for name in ("apgd-ce", "square"):
            with self.subTest(component=name):
                a = run_component(name, self.model, self.x, self.y, todo, norm="l2", eps=2.0, seed=3, **FAST)
                b = run_component(name, self.model, self.x, self.y, todo, norm="l2", eps=2.0, seed=3, **FAST)
                self.assertTrue(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))

    def test_dlr_needs_enough_classes(self):
        logits3, logits2 = torch.randn(4, 3), torch.randn(4, 2)
        y = torch.zeros(4, dtype=torch.long)
        _apgd.dlr_loss(logits3, y)   # 3 classes are enough for untargeted DLR
        with self.assertRaisesRegex(ValueError, ">= 3 classes"):
            _apgd.dlr_loss(logits2, y)
        with self.assertRaisesRegex(ValueError, ">= 4 classes"):
            _apgd.dlr_targeted_loss(logits3, y, y + 1)
        model3 = SmallNet(num_classes=3).eval()
        x, y3 = make_data(model=model3, n_wrong=0)
        with self.assertRaisesRegex(ValueError, "4 classes"):
            autoattack(model3, x, y3, norm="linf", **FAST)
        with self.assertRaisesRegex(ValueError, "4 classes"):
            autoattack(model3, x, y3, norm="linf", version="apgd", **FAST)
        with self.assertRaisesRegex(ValueError, "3 classes"):
            _apgd.apgd(SmallNet(num_classes=2).eval(), x, y3 % 2, torch.ones(8, dtype=torch.bool), norm="linf",
                       eps=0.1, loss="dlr", n_iter=2)

    def test_fab_projection_is_exact(self):
        """Box-constrained hyperplane projections against scipy (optimal norm, feasibility; l_2: the point)."""
        from scipy.optimize import linprog, minimize

        g = torch.Generator().manual_seed(0)
        d = 8
        for trial in range(4):
            p = torch.rand(1, d, generator=g, dtype=torch.float64)
            w = torch.randn(1, d, generator=g, dtype=torch.float64)
            b = (w * p).sum(1) + (0.3 + 0.2 * trial) * (1 if trial % 2 else -1)
            pn, wn, bn = p.numpy()[0], w.numpy()[0], b.item()
            bounds = list(zip(-pn, 1 - pn))
            for norm in P:
                with self.subTest(trial=trial, norm=norm):
                    dd = _fab.project_hyperplane_box(p, w, b, norm)
                    self.assertAlmostEqual((w * (p + dd)).sum().item(), bn, places=8)
                    self.assertTrue(((p + dd) >= -1e-12).all() and ((p + dd) <= 1 + 1e-12).all())
                    got = lp_norm(dd, P[norm]).item()
                    if norm == "linf":   # min t s.t. |d_i| <= t, w.d = c, box
                        res = linprog(np.r_[np.zeros(d), 1.0],
                                      A_ub=np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]]),
                                      b_ub=np.zeros(2 * d), A_eq=np.r_[wn, 0.0][None], b_eq=[bn - wn @ pn],
                                      bounds=bounds + [(0, None)])
                        self.assertAlmostEqual(got, res.fun, places=6)
                    elif norm == "l1":   # d = u - v, u, v >= 0
                        res = linprog(np.ones(2 * d), A_eq=np.r_[wn, -wn][None], b_eq=[bn - wn @ pn],
                                      bounds=[(0, 1 - v) for v in pn] + [(0, v) for v in pn])
                        self.assertAlmostEqual(got, res.fun, places=6)
                    else:
                        res = minimize(lambda v: v @ v, np.zeros(d), method="SLSQP", bounds=bounds,
                                       constraints=[{"type": "eq", "fun": lambda v: wn @ (pn + v) - bn}],
                                       options={"ftol": 1e-14, "maxiter": 500})
                        self.assertLess(np.abs(res.x - dd.numpy()[0]).max(), 1e-4)
        # unreachable hyperplane: the farthest box point in the direction of w
        p, w = torch.full((1, 4), 0.5, dtype=torch.float64), torch.tensor([[1.0, -2.0, 0.0, 1.0]], dtype=torch.float64)
        for norm in P:
            dd = _fab.project_hyperplane_box(p, w, torch.tensor([100.0], dtype=torch.float64), norm)
            self.assertTrue(torch.allclose(dd, torch.tensor([[0.5, -0.5, 0.0, 0.5]], dtype=torch.float64)))

    def test_l1_large_eps_schedule(self):
        """3eps / 2eps / eps over 30 / 30 / 40% of the iterations; the l1 APGD run stays within eps."""
        seen = []
        real = _apgd.apgd_run

        def spy(*args, **kw):
            seen.append((kw["eps"], kw["n_iter"]))
            return real(*args, **kw)

        with mock.patch.object(_apgd, "apgd_run", spy):
            _apgd.apgd(self.model, self.x, self.y, torch.ones(8, dtype=torch.bool), norm="l1", eps=2.0, n_iter=10,
                       large_eps=True, generator=torch.Generator().manual_seed(0))
        self.assertEqual(seen, [(6.0, 3), (4.0, 3), (2.0, 4)])


class TestRunner(unittest.TestCase):
    def setUp(self):
        self.model = SmallNet().eval()
        self.x, self.y = make_data(model=self.model)

    def test_budget_and_misclassified_points(self):
        for norm in P:
            with self.subTest(norm=norm):
                rec = Recorder(self.model)
                x0 = self.x.clone()
                x_adv, robust = autoattack(rec, self.x, self.y, norm=norm, **FAST)
                self.assertTrue(torch.equal(self.x, x0))
                self.assertEqual(robust.dtype, torch.bool)
                self.assertEqual(rec.sizes[0], 8)                 # the clean pass
                self.assertLessEqual(max(rec.sizes[1:]), 6)       # the 2 misclassified points are never attacked
                self.assertFalse(robust[:2].any())
                self.assertTrue(torch.equal(x_adv[:2], self.x[:2]))
                self.assertTrue(torch.equal(x_adv[robust], self.x[robust]))
                norms = lp_norm(x_adv - self.x, P[norm])
                self.assertTrue((norms <= EPS[norm] * (1 + 1e-5) + 1e-6).all(), norms)
                broken = ~robust
                broken[:2] = False
                if broken.any():
                    with torch.no_grad():
                        self.assertTrue((self.model(x_adv[broken]).argmax(1) != self.y[broken]).all())

    def test_worst_case_union(self):
        """robust == clean-correct AND no component (run alone on all clean-correct points) broke the point;
        the standard version is at least as strong as version='apgd', point-wise."""
        mixed = {"linf": 4 / 255, "l2": 0.5, "l1": 3.0}   # budgets giving some robust and some broken points here
        for norm, eps in mixed.items():
            robust_by_version = {}
            for version in VERSIONS:
                with self.subTest(norm=norm, version=version):
                    _, robust = autoattack(self.model, self.x, self.y, norm=norm, eps=eps, version=version, **FAST)
                    with torch.no_grad():
                        expected = self.model(self.x).argmax(1) == self.y
                    correct = expected.clone()
                    for name in VERSIONS[version]:
                        cand, br = run_component(name, self.model, self.x, self.y, correct, norm=norm, eps=eps,
                                                 **FAST)
                        expected &= ~(br & accept_adversarial(self.model, self.x, self.y, cand, norm=norm, eps=eps))
                    self.assertTrue(torch.equal(robust, expected), (robust, expected))
                    self.assertTrue(0 < int(robust.sum()) < int(correct.sum()), robust)
                    robust_by_version[version] = robust
            self.assertFalse((robust_by_version["standard"] & ~robust_by_version["apgd"]).any())

    def test_later_components_see_only_robust_points(self):
        """After APGD-CE broke k points, every later forward pass holds at most the remaining robust points."""
        rec = Recorder(self.model)
        autoattack(rec, self.x, self.y, norm="linf", version="apgd", **FAST)
        ce = Recorder(self.model)
        correct = self.model(self.x).argmax(1) == self.y
        _, br = run_component("apgd-ce", ce, self.x, self.y, correct, norm="linf", eps=EPS["linf"], **FAST)
        left = int((correct & ~br).sum())
        self.assertLess(left, int(correct.sum()))   # APGD-CE did break something here
        n_ce = 1 + len(ce.sizes) + 1                # clean pass, APGD-CE's passes, the runner's re-check
        self.assertLessEqual(max(rec.sizes[n_ce:]), left)

    def test_seeds_rng_mode_and_grads(self):
        state = torch.get_rng_state()
        a = autoattack(self.model, self.x, self.y, norm="l2", eps=1.0, seed=0, **FAST)
        self.assertTrue(torch.equal(torch.get_rng_state(), state), "global RNG disturbed")
        b = autoattack(self.model, self.x, self.y, norm="l2", eps=1.0, seed=0, **FAST)
        self.assertTrue(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
        c = autoattack(self.model, self.x, self.y, norm="l2", eps=1.0, seed=1, **FAST)
        self.assertFalse(torch.equal(a[0], c[0]))   # different random starts give different adversarials
        self.assertFalse(self.model.training)
        train_model = SmallNet().train()
        autoattack(train_model, self.x, self.y, norm="linf", version="apgd", **FAST)
        self.assertTrue(train_model.training)
        self.assertTrue(all(p.grad is None for p in self.model.parameters()))

    def test_arguments(self):
        with self.assertRaisesRegex(ValueError, "'standard', 'apgd'"):
            autoattack(self.model, self.x, self.y, version="plus")
        with self.assertRaisesRegex(ValueError, "norm"):
            autoattack(self.model, self.x, self.y, norm="l3")
        x_adv, robust = autoattack(self.model, self.x, self.y, eps=0.0)
        self.assertTrue(torch.equal(x_adv, self.x))
        self.assertTrue(torch.equal(robust, self.model(self.x).argmax(1) == self.y))
        self.assertIn("autoattack", attacks.__all__)
        self.assertNotIn("autoattack", attacks.ATTACKS)
        self.assertIs(attacks.autoattack, autoattack)
        self.assertIs(attacks.ATTACKS["ppgd"], ppgd)


class TestPPGD(unittest.TestCase):
    def setUp(self):
        self.model = SmallNet().eval()
        self.x, self.y = make_data(model=self.model, n_wrong=0)
        self.phi = feature_fn(self.model, "self")

    def test_outputs_within_bound(self):
        for lpips_net in ("self", FixedFeatures()):
            phi = feature_fn(self.model, lpips_net)
            for eps in (0.5, 0.2, torch.tensor([0.5, 0.1, 0.0, 0.3, 0.5, 0.2, 0.05, 0.4])):
                with self.subTest(lpips_net=type(lpips_net).__name__, eps=eps):
                    out = ppgd(self.model, self.x, self.y, eps=eps, steps=3, lpips_net=lpips_net,
                               generator=torch.Generator().manual_seed(0))
                    bound = eps if isinstance(eps, torch.Tensor) else torch.full((8,), eps)
                    with torch.no_grad():
                        d = lpips_distance(phi, self.x, out)
                    self.assertTrue((d <= bound + 1e-4).all(), (d, bound))
                    self.assertTrue(out.min() >= 0 and out.max() <= 1)
                    if isinstance(eps, torch.Tensor):
                        self.assertTrue(torch.equal(out[2], self.x[2]))

    def test_projection_newton_and_bisection(self):
        """Far-away points (random images) are projected into the bound, by Newton and by the bisection fallback."""
        g = torch.Generator().manual_seed(3)
        far = torch.rand(self.x.shape, generator=g)
        eps_v = torch.full((8,), 0.3)
        with torch.no_grad():
            feats = perceptual.lpips_features(self.phi, self.x)
            self.assertTrue((lpips_distance(self.phi, self.x, far) > 0.3).all())
        for newton_iters in (perceptual.NEWTON_ITERS, 0):   # 0: bisection only
            with self.subTest(newton_iters=newton_iters), mock.patch.object(perceptual, "NEWTON_ITERS", newton_iters):
                out = perceptual._project(self.phi, self.x, feats, far, eps_v)
                with torch.no_grad():
                    d = lpips_distance(self.phi, self.x, out)
                self.assertTrue((d <= 0.3 + 1e-4).all(), d)
                self.assertTrue((d > 0.05).all(), d)   # projected onto (near) the bound, not collapsed to x

    def test_eps_zero_seed_and_side_effects(self):
        out = ppgd(self.model, self.x, self.y, eps=0.0, steps=2)
        self.assertTrue(torch.equal(out, self.x))
        a = ppgd(self.model, self.x, self.y, steps=2, generator=torch.Generator().manual_seed(1))
        b = ppgd(self.model, self.x, self.y, steps=2, generator=torch.Generator().manual_seed(1))
        self.assertTrue(torch.equal(a, b))
        self.assertTrue(all(p.grad is None for p in self.model.parameters()))
        self.assertFalse(self.model.training)

    def test_attack_raises_margin(self):
        out = ppgd(self.model, self.x, self.y, eps=0.5, steps=5)
        with torch.no_grad():
            before = perceptual.margin_loss(self.model(self.x), self.y)
            after = perceptual.margin_loss(self.model(out), self.y)
        self.assertGreater(after.mean().item(), before.mean().item())

    def test_bad_arguments(self):
        plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))   # no features(), no 4-D output to hook
        with self.assertRaisesRegex(ValueError, "no features.*4-D feature map.*lpips_net"):
            ppgd(plain, self.x, self.y, steps=1)
        self.assertTrue(all(not m._forward_hooks for m in plain.modules()))
        ppgd(plain, self.x, self.y, steps=1, lpips_net=FixedFeatures())   # fine with a fixed feature network
        with self.assertRaisesRegex(ValueError, "lpips_net"):
            ppgd(self.model, self.x, self.y, lpips_net="alexnet")
        with self.assertRaisesRegex(ValueError, "eps"):
            ppgd(self.model, self.x, self.y, eps=-0.1)
        with self.assertRaisesRegex(ValueError, "steps"):
            ppgd(self.model, self.x, self.y, steps=-1)


class Block(nn.Module):
    """conv-bn (stride s) + 1x1 projection shortcut, then an in-place ReLU; `out += skip` in place (torchvision)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout)
        self.skip, self.relu = nn.Conv2d(cin, cout, 1, stride), nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += self.skip(x)
        return self.relu(out)


class Nested(nn.Module):
    """stem (16x16) -> stages[0] (8x8) -> stages[1] (4x4, a Sequential of two blocks) -> functional pool -> head."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList([nn.Sequential(Block(4, 6, 2)), nn.Sequential(Block(6, 8, 2), Block(8, 8, 1))])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        out = self.stem(x)
        for stage in self.stages:
            out = stage(out)
        return self.head(F.adaptive_avg_pool2d(out, 1))


def plain_cnn(seed=0):
    """An nn.Sequential CNN without features(): maps at 16x16, 8x8 and the global pool's 1x1."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 8, 3, 2, 1),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


class TestPPGDHookedFeatures(unittest.TestCase):
    """ppgd's "self" distance on models without features(): maps by forward hooks (perceptual.hooked_features)."""

    def test_rule_picks_the_last_map_per_resolution(self):
        x = torch.rand(2, 3, 16, 16)
        model = Nested().eval()
        maps = hooked_features(model)(x)
        self.assertEqual([tuple(m.shape) for m in maps], [(2, 4, 16, 16), (2, 6, 8, 8), (2, 8, 4, 4)])
        with torch.no_grad():                                     # the containers' outputs: stem, stage 0, stage 1
            s = model.stem(x)
            expected = [s, model.stages[0](s), model.stages[1](model.stages[0](s))]
        for got, want in zip(maps, expected):
            self.assertTrue(torch.allclose(got, want))
        self.assertTrue(all(m.requires_grad for m in maps))        # graph kept (PPGD backpropagates through it)
        self.assertTrue(no_hooks(model))
        maps = hooked_features(plain_cnn())(x)                     # the global pool's (B, C, 1, 1) output counts
        self.assertEqual([tuple(m.shape) for m in maps], [(2, 4, 16, 16), (2, 8, 8, 8), (2, 8, 1, 1)])

    def test_preact_resnet_maps(self):
        """eval.py's PreActResNet-18: same shapes as features(); what the rule takes at each size is documented."""
        import importlib
        ev = importlib.import_module("eval")
        torch.manual_seed(0)
        model = ev.PreActResNet18(width=8).eval()
        with torch.no_grad():
            for m in model.modules():                              # non-trivial BN, so bn(f) != f
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            hooked, feats = hooked_features(model)(x), model.features(x)
            self.assertEqual([m.shape for m in hooked], [f.shape for f in feats])
            # pre-activation blocks: each size's last output is the next stage's first bn1 + ReLU of the stage
            # output (layer1..layer3); at 4x4 the final bn of layer4's output
            for i, layer in enumerate((model.layer2, model.layer3, model.layer4)):
                self.assertTrue(torch.allclose(hooked[i], F.relu(layer[0].bn1(feats[i])), atol=1e-6))
            self.assertTrue(torch.allclose(hooked[3], model.bn(feats[3]), atol=1e-6))
        self.assertIs(feature_fn(model, "self").__func__, type(model).features)   # features() kept when present
        self.assertTrue(no_hooks(model))

    def test_ppgd_on_models_without_features(self):
        for model in (plain_cnn(), Nested().eval()):
            x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                y = model(x).argmax(1)
            with self.subTest(model=type(model).__name__):
                self.assertFalse(hasattr(model, "features"))
                out = ppgd(model, x, y, eps=0.3, steps=2, generator=torch.Generator().manual_seed(0))
                with torch.no_grad():
                    d = lpips_distance(hooked_features(model), x, out)
                self.assertTrue((d <= 0.3 + 1e-4).all(), d)
                self.assertTrue((d > 0).any(), d)                  # it moved
                self.assertTrue(out.min() >= 0 and out.max() <= 1)
                self.assertTrue(no_hooks(model))
                self.assertFalse(model.training)
                self.assertTrue(all(p.grad is None for p in model.parameters()))

    def test_one_forward_per_call_and_hooks_removed_on_error(self):
        rec = Recorder(plain_cnn())
        phi = hooked_features(rec)
        phi(torch.rand(3, 3, 16, 16))
        self.assertEqual(rec.sizes, [3])                           # one forward of the model per phi call
        self.assertTrue(no_hooks(rec))

        class Broken(nn.Module):
            def __init__(self):
                super().__init__()
                self.c = nn.Conv2d(3, 4, 3)

            def forward(self, x):
                self.c(x)
                raise RuntimeError("boom")
        broken = Broken()
        with self.assertRaisesRegex(RuntimeError, "boom"):
            hooked_features(broken)(torch.rand(1, 3, 16, 16))
        self.assertTrue(no_hooks(broken))


if __name__ == "__main__":
    unittest.main()
