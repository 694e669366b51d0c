"""Eq. (26) probe, run by hand (not in CI): how much signal the grad-based bound's adversarial gradient carries.

    python -m tests.caat_eq26_probe --ckpt runs/x/model.pt --data-dir data/cifar10-offline --no-download [--n 512]

Alg. 1 computes the bound (line 6) after the init x + 0.001 N(0, I) (line 5) and before the attack steps. There the
adversary's loss KL(f(x) || f(.)) sits at its minimum (0, with zero gradient at x itself), so its gradient is only
the curvature times the tiny noise. This prints, over the first n training images in batches of 128, the Pearson
and Spearman correlations between the batch-max-normalised gradient norms g_bar at the init point and at the points
one and K attack steps later, for the adversary (KL) and the anti-adversary (CE), and the size of each norm.
"""

import argparse

import numpy as np
import torch
from scipy import stats

import caat_meta as cm


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="K of the attack")
    a = p.parse_args()
    torch.manual_seed(0)
    meta = cm.load_checkpoint(a.ckpt)
    args = cm.get_args(["--data-dir", a.data_dir, "--download" if a.download else "--no-download", "--device", "cpu",
                        "--train-subset", str(a.n), "--meta-per-class", "1"])
    data = cm.make_datasets(args, torch.device("cpu"))
    model = cm.build_model(data["num_classes"], meta["mean"], meta["std"], meta["width"], meta["activation"])
    cm.load_weights(model, a.ckpt).eval()
    eps = torch.full((128,), 8 / 255)
    g = {k: [] for k in ("adv0", "adv1", "advK", "anti0", "anti1", "antiK")}
    for x, y in cm.iterate_batches(data["train_x"], data["train_y"], 128):
        e = eps[: len(y)]
        with torch.no_grad():
            logits = model(x)
        for tag, steps in (("0", 0), ("1", 1), ("K", a.steps)):
            xa = cm.trades_init(x, 1) if steps == 0 else cm.perturb(model, x, y, e, steps, 1, "kl", 1)
            xt = cm.trades_init(x, 2) if steps == 0 else cm.perturb(model, x, y, e, steps, -1, "ce", 2)
            ga, gt = cm.input_grad_norms(model, logits, xa, xt, y)
            g["adv" + tag].append(ga / ga.max())      # Eq. (26)'s normalisation, per batch
            g["anti" + tag].append(gt / gt.max())
            g.setdefault("raw_adv" + tag, []).append(ga)
            g.setdefault("raw_anti" + tag, []).append(gt)
    g = {k: torch.cat(v).numpy() for k, v in g.items()}
    print(f"{a.n} images, {a.ckpt}")
    for side in ("adv", "anti"):
        for tag in ("1", "K"):
            r, rho = stats.pearsonr(g[side + "0"], g[side + tag])[0], stats.spearmanr(g[side + "0"], g[side + tag])[0]
            print(f"{side:4s} g_bar at init vs after {tag} step(s): Pearson {r:+.3f}, Spearman {rho:+.3f}")
        print(f"{side:4s} median ||g||: init {np.median(g['raw_' + side + '0']):.2e}, 1 step "
              f"{np.median(g['raw_' + side + '1']):.2e}, K steps {np.median(g['raw_' + side + 'K']):.2e}")


if __name__ == "__main__":
    main()
