"""`python -m attacks`: list the registered attacks, time them, or draw a gallery of what each one does.

    python -m attacks --list                                  # table of every attack in attacks.ATTACKS
    python -m attacks --list --time --batch-size 128          # + per-step cost relative to one linf step
    python -m attacks --gallery gallery.png                   # fake images, tiny seeded random CNN
    python -m attacks --gallery gallery.png --data-dir data/cifar10 --ckpt runs/.../model.pt

The table is read from the registry, so attacks added later appear automatically: the family comes from the groups
in attacks/__init__.py, the defaults (eps / steps / step_size) from each function's signature, the other levels from
the module constant LEVELS = {"low": {...}, "medium": {...}, "high": {...}} and "what eps bounds" from the module
constant EPS_MEANING (else the "Latent"/"Constraint" line of the module docstring, else the function docstring); that
long text is listed below the table, wrapped, so every line fits in 100 columns.

--gallery writes one PNG (torchvision.utils.make_grid, labelled with Pillow): row 0 the clean images, then one row
per attack in registry order, each labelled on the left with its name and the accuracy on those images; one line per
row is printed as soon as the attack finishes (name, seconds, accuracy). Images come from the CIFAR-10 test batch
under --data-dir (a directory holding cifar-10-batches-py/, or that folder itself), else seeded smooth fake images.
Every attack runs at its default (CIFAR-10 "medium") settings against the model: a tiny seeded random CNN defined
here, or with --ckpt a PreActResNet-18 rebuilt from a model.pt / ckpt.pt written by the training scripts (metadata
"arch", "width", "num_classes", "mean", "std", "activation"; for a plain state_dict the width and classes are read
from its shapes, --activation etc. flags override). Input normalisation (--input-norm, as eval.py): "dataset" puts
the CIFAR-10 mean/std inside the model, "none" feeds raw [0, 1] images; default: the checkpoint's metadata, else (a
plain state_dict) the dataset's mean/std. The choice is printed, with a hint when the clean accuracy on real data is
below 0.3. The checkpoint and the CIFAR-10 pickle are read by eval.py (`build_model_from_ckpt`, the shared data
block's `read_split`), imported only for --ckpt / --data-dir: the attacks themselves never import the top-level
scripts. Labels: the true labels for real data, the model's clean predictions for fake data.

--time measures, on the same model and batch, the time per attack step relative to one linf step:
(t(steps=k) - t(steps=0)) / k for each attack, divided by the same for linf (best of --repeats runs).

torchvision and Pillow are imported only inside the gallery function (the attacks themselves never need them).
"""

import argparse
import importlib
import inspect
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
from attacks import ATTACKS

# The benchmark's "core" attacks (the core group of eval.sh in centerforaisafety/adversarial-corruptions; UA2 is
# their mean), the rest are "extra".
CORE_SEMANTIC = ("wood", "elastic", "pixel", "snow", "gabor", "jpeg", "glitch", "kaleidoscope")
LP_MEANING = {"linf": "||x_adv - x||_inf (pixels)", "l2": "||x_adv - x||_2 (pixels)", "l1": "||x_adv - x||_1 (pixels)"}


# ----------------------------------------------------------------------------------------------- the --list table
def family(name: str) -> str:
    if name in attacks.LP:
        return "l_p"
    if name in attacks.PERCEPTUAL:
        return "perceptual"
    if name in CORE_SEMANTIC:
        return "semantic core"
    if name in attacks.SEMANTIC:
        return "semantic extra"
    return ATTACKS[name].__module__.rsplit(".", 1)[-1]


def eps_meaning(name: str) -> str:
    """What eps bounds: EPS_MEANING, else the module docstring's Latent/Constraint line, else the docstring."""
    fn = ATTACKS[name]
    module = sys.modules[fn.__module__]
    if getattr(module, "EPS_MEANING", None):
        return module.EPS_MEANING
    if name in LP_MEANING:
        return LP_MEANING[name]
    for line in (module.__doc__ or "").splitlines():
        if line.strip().lower().startswith(("constraint", "latent")):
            return line.split(":", 1)[-1].strip()
    return (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "?"


def fmt(v) -> str:
    if v is None:
        return "auto"
    if isinstance(v, float):
        k = v * 255   # show budgets like 8/255 as such (only when the decimal form is long)
        return f"{round(k)}/255" if len(f"{v:.6g}") > 6 and abs(k - round(k)) < 1e-6 else f"{v:.6g}"
    return str(v)


def attack_row(name: str) -> dict:
    """One table row: defaults from the signature, levels from the module's LEVELS (if any)."""
    fn = ATTACKS[name]
    params = inspect.signature(fn).parameters
    default = {k: params[k].default if k in params else None for k in ("eps", "steps", "step_size")}
    levels = getattr(sys.modules[fn.__module__], "LEVELS", None)
    lv = ", ".join(fmt(levels[k]["eps"]) for k in ("low", "medium", "high")) if levels else "-"
    return {"name": name, "family": family(name), "eps bounds": eps_meaning(name), "eps": fmt(default["eps"]),
            "steps": fmt(default["steps"]), "step_size": fmt(default["step_size"]), "eps low, med, high": lv}


def print_table(rows, columns, width=100):
    """The table (columns), then each attack's "eps bounds" text below it, wrapped to `width` columns."""
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns).rstrip())
    print("-+-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(str(r[c]).ljust(widths[c]) for c in columns).rstrip())
    name_w = max(len(r["name"]) for r in rows) + 2
    print("\nwhat eps bounds:")
    for r in rows:
        print(textwrap.fill(r["eps bounds"], width, initial_indent=f"{r['name']:<{name_w}}",
                            subsequent_indent=" " * name_w))


# ------------------------------------------------------------------------------------------- the model, the data
class TinyCNN(nn.Module):
    """A small seeded random CNN (default gallery / timing model; no checkpoint needed)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.linear = nn.Linear(64, num_classes)

    def features(self, x):
        """The three ReLU maps (ppgd's "self" distance uses them; without features() it would hook the model)."""
        out, feats = x - 0.5, []
        for conv in (self.conv1, self.conv2, self.conv3):
            out = F.relu(conv(out))
            feats.append(out)
        return feats

    def forward(self, x):
        return self.linear(self.features(x)[-1].mean((2, 3)))


def eval_script():
    """The top-level eval.py, imported only when --ckpt / --data-dir need it (`import eval` shadows the builtin)."""
    return importlib.import_module("eval")


def load_model(path, width=None, num_classes=None, activation=None, mean=None, std=None):
    """eval.py's PreActResNet-18 from a model.pt / ckpt.pt (metadata) or a plain state_dict (width and classes read
    from its shapes unless given), eval mode on the CPU. mean / std None: the metadata's, else none ([0, 1])."""
    return eval_script().build_model_from_ckpt(path, width=width, num_classes=num_classes, activation=activation,
                                               mean=mean, std=std)


def input_normalisation(path, input_norm=None):
    """(mean, std, description) for --ckpt, as eval.py chooses: the flag ("dataset" / "none"), else the checkpoint's
    metadata (mean = std = None: build_model_from_ckpt reads it), else for a plain state_dict the dataset's."""
    ev = eval_script()
    ckpt = ev.load_checkpoint(path)
    meta = ckpt if isinstance(ckpt, dict) and "arch" in ckpt else {}
    dataset = meta.get("dataset", "cifar10") if meta.get("dataset") in ev.DATASETS else "cifar10"
    ds = ev.DATASETS[dataset]
    if input_norm == "none":
        return (0.0,) * 3, (1.0,) * 3, "none (--input-norm none): raw [0, 1] input"
    if input_norm == "dataset" or not meta:
        how = "--input-norm dataset" if input_norm else "default for a plain state_dict, as eval.py"
        return ds["mean"], ds["std"], f"{dataset} mean/std inside the model ({how})"
    if "mean" not in meta:
        return None, None, "none: the checkpoint's metadata has no mean/std ([0, 1] input)"
    return None, None, f"the checkpoint's metadata: mean {tuple(meta['mean'])}, std {tuple(meta['std'])}"


def load_cifar_test(data_dir, n):
    """The first n CIFAR-10 test images (B, 3, 32, 32) in [0, 1] and their labels (eval.py's `read_split`)."""
    root = Path(data_dir)
    root = root.parent if root.name == "cifar-10-batches-py" else root   # the folder itself, or its parent
    x, y = eval_script().read_split("cifar10", root, train=False)
    return x[:n].float() / 255, y[:n]


def fake_images(n, seed):
    """Seeded smooth colour images (bicubic-upsampled 4 x 4 noise), so the corruptions are easy to see."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(32, 32), mode="bicubic",
                         align_corners=False).clamp(0, 1)


def get_model_and_batch(args, n):
    device = torch.device(args.device)
    if args.ckpt:
        mean, std, how = input_normalisation(args.ckpt, args.input_norm)
        model = load_model(args.ckpt, args.width, args.num_classes, args.activation, mean, std)
        print(f"{args.ckpt}: input normalisation: {how}", flush=True)
    else:
        torch.manual_seed(args.seed)
        model = TinyCNN().eval()
    model = model.to(device)
    if args.data_dir:
        x, y = load_cifar_test(args.data_dir, n)
        x, y = x.to(device), y.to(device)
    else:
        x = fake_images(n, args.seed).to(device)
        with torch.no_grad():
            y = model(x).argmax(1)
    return model, x, y


# ------------------------------------------------------------------------------------------------ timing, gallery
def time_per_step(fn, model, x, y, steps, repeats, device):
    """Seconds per attack step: (t(steps) - t(0)) / steps, best of `repeats` runs.

    On the CPU the clock is this process's CPU time (robust to other processes sharing the cores; it equals wall
    time for a single-threaded run); on CUDA it is wall time after synchronising.
    """
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def once(k):
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = clock()
        fn(model, x, y, steps=k)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - t0
    once(1)   # warm-up
    return max(min(once(steps) for _ in range(repeats)) - min(once(0) for _ in range(repeats)), 1e-9) / steps


def save_labelled_grid(rows, labels, scale, path):
    """One PNG: the rows of images (make_grid) with each row's label drawn on a white margin on the left (Pillow)."""
    from PIL import Image, ImageDraw                       # only the gallery needs Pillow / torchvision
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    grid = torch.cat(rows).detach().cpu()
    if scale > 1:
        grid = F.interpolate(grid, scale_factor=scale, mode="nearest")
    pad, h = 2, grid.shape[2]
    images = to_pil_image(make_grid(grid, nrow=rows[0].shape[0], padding=pad, pad_value=1.0))
    measure = ImageDraw.Draw(images)                       # the default font (Pillow's built-in)
    margin = max(measure.multiline_textbbox((0, 0), t)[2] for t in labels) + 2 * 4
    canvas = Image.new("RGB", (margin + images.width, images.height), "white")
    canvas.paste(images, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(labels):                      # row i spans pad + i (h + pad) .. + h (make_grid)
        text_h = draw.multiline_textbbox((0, 0), text)[3]
        draw.multiline_text((4, pad + i * (h + pad) + max(h - text_h, 0) // 2), text, fill="black")
    canvas.save(path)


def gallery(args, names):
    model, x, y = get_model_and_batch(args, args.n_images)
    source = "CIFAR-10 test" if args.data_dir else "fake"
    print(f"gallery: {len(names) + 1} rows x {x.shape[0]} {source} images, model "
          f"{'--ckpt ' + args.ckpt if args.ckpt else 'tiny random CNN'}", flush=True)

    def accuracy(images):
        with torch.no_grad():
            return (model(images).argmax(1) == y).float().mean().item()

    rows, accs = [x], [accuracy(x)]
    print(f"  row  0: {'clean':14s} {'':8s} accuracy on these images {accs[0]:.2f}", flush=True)
    if args.data_dir and args.ckpt and accs[0] < 0.3:
        print(f"  low clean accuracy ({accs[0]:.2f}): if the model was trained on normalised inputs, try "
              f"--input-norm dataset / none", flush=True)
    for i, name in enumerate(names, 1):
        torch.manual_seed(args.seed)   # every attack sees the same seed, whatever ran before it
        t0 = time.perf_counter()
        rows.append(ATTACKS[name](model, x, y))
        accs.append(accuracy(rows[-1]))
        print(f"  row {i:2d}: {name:14s} {time.perf_counter() - t0:6.1f} s accuracy on these images {accs[-1]:.2f}",
              flush=True)
    labels = [f"{n}\nacc {a:.2f}" for n, a in zip(["clean"] + list(names), accs)]
    save_labelled_grid(rows, labels, args.scale, args.gallery)
    print(f"wrote {args.gallery}: {len(rows)} rows x {x.shape[0]} images", flush=True)


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m attacks", allow_abbrev=False, description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the table of registered attacks")
    p.add_argument("--time", action="store_true", help="with --list: add the per-step cost relative to linf")
    p.add_argument("--gallery", type=str, default="", help="write a PNG grid of every attack's output here")
    p.add_argument("--attacks", type=str, default="all", help="comma list of attack names, or 'all'")
    p.add_argument("--data-dir", type=str, default="", help="CIFAR-10 pickle directory (else fake images)")
    p.add_argument("--ckpt", type=str, default="", help="model.pt / ckpt.pt / state_dict of a PreActResNet-18")
    p.add_argument("--width", type=int, default=None, help="PreActResNet-18 width (plain state_dicts)")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes (plain state_dicts)")
    p.add_argument("--activation", type=str, default=None, choices=["relu", "softplus"], help="block activation")
    p.add_argument("--input-norm", type=str, default=None, choices=["dataset", "none"], help="with --ckpt: mean/std "
                   "inside the model (default: the metadata's, else the dataset's, as eval.py; none: [0, 1] input)")
    p.add_argument("--n-images", type=int, default=8, help="images per gallery row")
    p.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscaling of the gallery images")
    p.add_argument("--batch-size", type=int, default=128, help="batch size for --time")
    p.add_argument("--time-steps", type=int, default=5, help="attack steps timed per run for --time")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per attack for --time (best is kept)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, fake images and attacks")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(args):
    names = list(ATTACKS) if args.attacks == "all" else attacks.registered(args.attacks)
    if not (args.list or args.gallery):
        print("nothing to do: pass --list and/or --gallery PATH (see --help)")
        return 2
    if args.input_norm and not args.ckpt:
        print("--input-norm applies to a --ckpt model only (the tiny random CNN takes [0, 1] input)")
        return 2
    if args.list:
        rows = [attack_row(n) for n in names]
        columns = ["name", "family", "eps", "steps", "step_size", "eps low, med, high"]
        if args.time:
            model, x, y = get_model_and_batch(args, args.batch_size)
            device = torch.device(args.device)
            t_linf = time_per_step(ATTACKS["linf"], model, x, y, args.time_steps, args.repeats, device)
            for r in rows:
                t = time_per_step(ATTACKS[r["name"]], model, x, y, args.time_steps, args.repeats, device)
                r["s/step"], r["x linf"] = f"{t:.4f}", f"{t / t_linf:.2f}"
            columns += ["s/step", "x linf"]
        print_table(rows, columns)
    if args.gallery:
        gallery(args, names)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args()))
