"""One training epoch of ``headsurgeon train`` (one head) against timm's own ``train.py``, side by side.

Both train the same timm model on the same images (an ImageFolder written from Fashion-MNIST, or
scikit-learn's digits where the Fashion-MNIST files are absent) with the same batch size,
optimizer, schedule, augmentation and loader (no AMP, no prefetcher, the same worker count), on
CPU. Runs alternate in pairs, timm first then headsurgeon first (A B B A A B ...), each a fresh
process; the ratio is taken within each pair.

What is timed, identically on both sides: the call of the function that trains one epoch
(timm's ``train_one_epoch``, headsurgeon's ``headsurgeon.train.train_epoch``), wrapped by this
script inside the child process. That is data loading and augmentation, forward, loss, backward,
optimizer and schedule steps, and each side's own per-step logging; it excludes start-up
(imports, model creation, dataset scan), evaluation and checkpoint writing.

headsurgeon carves its validation set out of the training folder; timm is given a training folder
holding exactly the images headsurgeon trains on, so both run the same number of steps over the
same images.

timm's ``train.py`` is not part of the timm wheel and is not copied into this repository: pass
``--timm-train PATH``, or the script reads it from a local git mirror of pytorch-image-models
(``--timm-repo``, a bare git directory).

    python benchmarks/vs_timm.py                        # resnet18, 32 px, batch 64, 3 repeats
    python benchmarks/vs_timm.py --timm-train ~/pytorch-image-models/train.py --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIRROR = "/work/.mirror/huggingface+pytorch-image-models/repo"


# ------------------------------------------------------------------ child processes (timed)

def _timed(fn, out: Path):
    """``fn`` with each call's wall time appended to ``out`` (one JSON number per line); with the
    environment variable VS_TIMM_PROFILE set, also a cProfile of the call in ``out`` + ``.prof``."""

    def wrapper(*args, **kwargs):
        prof = None
        if os.environ.get("VS_TIMM_PROFILE"):
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t = time.perf_counter()
        r = fn(*args, **kwargs)
        dt = time.perf_counter() - t
        if prof is not None:
            prof.disable()
            prof.dump_stats(str(out) + ".prof")
        with open(out, "a") as f:
            f.write(json.dumps(dt) + "\n")
        return r

    return wrapper


def child_timm(train_py: str, times: Path, argv: list[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("timm_train_script", train_py)
    mod = importlib.util.module_from_spec(spec)
    sys.argv = [train_py, *argv]
    spec.loader.exec_module(mod)  # defines the parser and functions; main() is not run on import
    mod.train_one_epoch = _timed(mod.train_one_epoch, times)
    mod.main()


def child_hs(times: Path, argv: list[str]) -> None:
    import headsurgeon.train as T
    from headsurgeon.cli import main

    T.train_epoch = _timed(T.train_epoch, times)  # fit() looks it up in the module at each epoch
    main(argv, standalone_mode=True)


# ------------------------------------------------------------------ setup

def timm_train_script(args) -> str:
    """The path of timm's train.py: --timm-train, else extracted from the git mirror; None if neither."""
    if args.timm_train:
        return args.timm_train if Path(args.timm_train).is_file() else None
    try:
        text = subprocess.run(["git", f"--git-dir={args.timm_repo}", "show", "HEAD:train.py"], check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(args.work) / "timm_train.py"
    path.write_text(text)
    return str(path)


def write_folder(root: Path, source: str, n_train: int, n_val: int) -> None:
    """``root/train/<class>/*.png`` and ``root/validation/<class>/*.png`` from a bundled dataset."""
    from headsurgeon import data as D

    if source == "fashion-mnist":
        train, test = D.FashionMNIST("train"), D.FashionMNIST("test")
    else:
        train, test = D.Digits("train"), D.Digits("test")
    for split, ds, n in (("train", train, n_train), ("validation", test, n_val)):
        if n > len(ds):
            sys.exit(f"vs_timm: {source} '{split}' has {len(ds)} images, fewer than the {n} asked for; lower --images")
        for i in range(n):
            img, y = ds[i]
            d = root / split / f"{y:02d}"
            d.mkdir(parents=True, exist_ok=True)
            img.save(d / f"{i:06d}.png")


def settings(args) -> dict:
    """The shared settings, as each side spells them."""
    hs = {"model": args.model, "model_kwargs": {}, "split.at": ["layer4"], "split.heads": 1,
          "data.dataset": "folder", "data.root": str(args.hs_root), "data.img_size": args.size,
          "data.batch_size": args.batch, "data.workers": args.workers, "data.val_fraction": args.val_fraction,
          "data.scale": [0.7, 1.0], "data.ratio": [0.9, 1.1], "data.hflip": 0.5, "data.color_jitter": 0.0,
          "loss.label_smoothing": 0.0, "optim.opt": "sgd", "optim.lr": args.lr, "optim.momentum": 0.9,
          "optim.weight_decay": 5e-4, "sched.sched": "cosine", "sched.warmup_epochs": 1, "sched.warmup_lr": 1e-4,
          "sched.min_lr": 0.0, "epochs": args.epochs, "device": "cpu", "seed": 0}
    timm = ["--data-dir", str(args.timm_root), "--train-split", "train", "--val-split", "validation",
            "--model", args.model, "--num-classes", "10", "--img-size", str(args.size), "-b", str(args.batch),
            "--validation-batch-size", str(2 * args.batch), "-j", str(args.workers), "--no-prefetcher",
            "--scale", "0.7", "1.0", "--ratio", "0.9", "1.1", "--hflip", "0.5", "--color-jitter", "0",
            "--train-interpolation", "bilinear", "--smoothing", "0", "--opt", "sgd", "--lr", str(args.lr),
            "--momentum", "0.9", "--weight-decay", "5e-4", "--sched", "cosine", "--warmup-epochs", "1",
            "--warmup-lr", "1e-4", "--min-lr", "0", "--epochs", str(args.epochs), "--device", "cpu", "--seed", "0",
            "--checkpoint-hist", "1", "--log-interval", "50"]
    return {"hs": hs, "timm": timm}


def hs_train_files(hs: dict) -> list[Path]:
    """The image files headsurgeon trains on (its training folder less the validation carve)."""
    from headsurgeon import data as D
    from headsurgeon import recipe as R

    flat, _ = R.load(None, tuple(f"{k}={json.dumps(v)}" for k, v in hs.items()))
    view = D.splits(flat.data).train
    return [Path(view.base.reader.samples[i][0]) for i in view.indices]


def run_side(side: str, args, cfg: dict, k: int) -> dict:
    times = Path(args.work) / f"{side}-{k}.times"
    out = Path(args.work) / f"{side}-{k}"
    if side == "timm":
        argv = [*cfg["timm"], "--output", str(out)]
        cmd = [sys.executable, __file__, "--child", "timm", "--child-script", args.script, "--child-times", str(times),
               "--", *argv]
    else:
        argv = ["train", *[a for k_, v in cfg["hs"].items() for a in ("--set", f"{k_}={json.dumps(v)}")], "-o", str(out)]
        cmd = [sys.executable, __file__, "--child", "hs", "--child-times", str(times), "--", *argv]
    t = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(args.threads)}
    if args.profile:
        env["VS_TIMM_PROFILE"] = "1"
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0 or not times.is_file():
        sys.exit(f"vs_timm: the {side} run failed (exit {p.returncode}): "
                 f"{(p.stderr or p.stdout).strip().splitlines()[-1:] or ['no output']}")
    epochs = [json.loads(x) for x in times.read_text().split()]
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        shutil.copy(str(times) + ".prof", Path(args.profile) / f"{side}-{k}.prof")
    return {"side": side, "epoch_s": epochs, "process_s": wall, "log_tail": (p.stdout + p.stderr)[-1500:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timm-train", default=None, help="path of timm's train.py (default: from --timm-repo)")
    ap.add_argument("--timm-repo", default=MIRROR, help="a git directory of pytorch-image-models to read train.py from")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    ap.add_argument("--images", type=int, default=4096, help="training images headsurgeon's folder holds")
    ap.add_argument("--val-images", type=int, default=256)
    ap.add_argument("--val-fraction", type=float, default=0.02, help="headsurgeon's validation carve")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (OMP_NUM_THREADS). 1 by default: "
                    "on a shared, oversubscribed CPU, OpenMP threads spin-wait on each other and a step slows 5-10x")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per run (each is timed)")
    ap.add_argument("--repeats", type=int, default=3, help="timm/headsurgeon pairs, alternated")
    ap.add_argument("--profile", default=None, metavar="DIR", help="also cProfile each timed epoch into DIR/<side>-<k>.prof "
                    "(read with python -m pstats; the profiler slows both sides)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "vs_timm.json"))
    ap.add_argument("--child", choices=["timm", "hs"], help=argparse.SUPPRESS)
    ap.add_argument("--child-script", help=argparse.SUPPRESS)
    ap.add_argument("--child-times", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "timm":
        return child_timm(args.child_script, Path(args.child_times), args.rest)
    if args.child == "hs":
        return child_hs(Path(args.child_times), args.rest)

    import torch
    import timm

    torch.set_num_threads(args.threads)
    cmd = "python benchmarks/vs_timm.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="vs_timm-") as work:
        args.work = work
        args.script = timm_train_script(args)
        if args.script is None:
            sys.exit(f"vs_timm: timm's train.py not found ({'--timm-train ' + args.timm_train if args.timm_train else 'no git mirror at ' + args.timm_repo}); "
                     f"pass --timm-train PATH to a checkout's train.py (it is not in the timm wheel)")
        args.hs_root, args.timm_root = Path(work) / "hs-data", Path(work) / "timm-data"
        source = args.data
        if source == "fashion-mnist":
            from headsurgeon import data as D
            if not Path(D.FASHION_MNIST_ROOT).is_dir():
                print("vs_timm: no Fashion-MNIST files; using digits", flush=True)
                source = "digits"
        write_folder(args.hs_root, source, args.images, args.val_images)
        cfg = settings(args)
        files = hs_train_files(cfg["hs"])
        for f in files:  # timm's training folder: exactly the images headsurgeon trains on
            d = args.timm_root / "train" / f.parent.name
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, d / f.name)
        shutil.copytree(args.hs_root / "validation", args.timm_root / "validation")
        steps = len(files) // args.batch  # both drop the last partial batch
        print(f"{source}: {len(files)} training images each, {steps} steps of {args.batch} per epoch", flush=True)
        runs = []
        for k in range(args.repeats):
            for side in ("timm", "hs") if k % 2 == 0 else ("hs", "timm"):  # ABBA: no side always runs second
                r = run_side(side, args, cfg, k)
                runs.append(r)
                print(f"  {side:4s} run {k + 1}: epoch(s) {', '.join(f'{t:.2f}' for t in r['epoch_s'])} s "
                      f"(process {r['process_s']:.1f} s)", flush=True)
    # one ratio per pair and epoch: headsurgeon / timm, the pair's runs being neighbours in time
    pairs = [sorted(p, key=lambda r: r["side"] != "timm") for p in zip(runs[0::2], runs[1::2])]  # (timm, hs)
    ratios = [h / t for a, b in pairs for t, h in zip(a["epoch_s"], b["epoch_s"])]
    med = statistics.median(ratios)
    timm_s = [t for r in runs if r["side"] == "timm" for t in r["epoch_s"]]
    hs_s = [t for r in runs if r["side"] == "hs" for t in r["epoch_s"]]
    result = {"cmd": cmd, "torch": torch.__version__, "timm": timm.__version__, "machine": platform.machine(),
              "threads": torch.get_num_threads(), "data": source, "train_images": len(files), "steps": steps,
              "batch": args.batch, "size": args.size, "model": args.model, "runs": runs, "ratios": ratios,
              "median_ratio": med, "timm_epoch_s": timm_s, "hs_epoch_s": hs_s, "settings": cfg}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\n`{cmd}` — {args.model}, {args.size} px, batch {args.batch}, {len(files)} {source} images "
          f"({steps} steps), CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, timm {timm.__version__}")
    print(f"timm train.py epoch: {', '.join(f'{t:.2f}' for t in timm_s)} s (median {statistics.median(timm_s):.2f})")
    print(f"headsurgeon epoch:   {', '.join(f'{t:.2f}' for t in hs_s)} s (median {statistics.median(hs_s):.2f})")
    print(f"headsurgeon / timm per pair: {', '.join(f'{r:.3f}' for r in ratios)}; median **{med:.3f}** "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}; goal <= 1.05)")


if __name__ == "__main__":
    main()
