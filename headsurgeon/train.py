"""The training engine: a head tree on timm's training stack, one process or DDP under torchrun.

Run directory::

    recipe.yaml      the resolved recipe (a resumed run must match it)
    metrics.jsonl    one line per epoch: per-head and ensemble top-1/top-5 on val and test; ``train_top1``:
                     each head's top-1 on the training labels (noisy ones included) during the epoch
    summary.json     best epoch/head and its accuracies (rewritten each epoch; ``finished`` at the end)
    curves.png       per-head validation/test top-1 per epoch
    best/            tree directory (spec.json, tree.safetensors) of the best validation epoch
    last/            tree directory + state.pt (optimizer, scheduler, scaler, epoch, RNG) for --resume

Checkpoint directories are written atomically; state is read with ``torch.load(weights_only=True)``
and weights with safetensors, so loading never unpickles arbitrary objects.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors.torch
import torch
import yaml

from . import data as D
from . import recipe as R
from .errors import HeadsurgeonError
from .loss import collaborative_loss
from .tree import HeadTree, split

RUNS = Path("runs")
STATE_FILE = "state.pt"
EMA_FILE = "ema.safetensors"


# ------------------------------------------------------------------------------- small helpers

def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)  # atomic: readers see the old or the new file, never half of one


def latest_run(root: Path = RUNS, prefix: str = "", need: str = "summary.json") -> Path | None:
    """Most recent run directory under ``root`` (by the mtime of ``need``)."""
    runs = [p for p in root.glob(f"{prefix}*") if (p / need).exists()] if root.is_dir() else []
    return max(runs, key=lambda p: (p / need).stat().st_mtime, default=None)


def _evaluate(tree: HeadTree, loader, device: torch.device, autocast: Callable, channels_last: bool,
              distributed: bool) -> dict[str, Any]:
    """Per-head and ensemble (mean of logits) top-1/top-5, exact over the whole split."""
    from timm.utils import accuracy

    was = tree.training
    tree.eval()
    heads = tree.num_heads
    correct = torch.zeros(heads + 1, 2, dtype=torch.float64, device=device)
    n = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                outs = [o.float() for o in tree(x)]
            k = min(5, outs[0].shape[1])
            for i, o in enumerate([*outs, torch.stack(outs).mean(0)]):
                a1, a5 = accuracy(o, y, topk=(1, k))
                correct[i] += torch.stack([a1, a5]).to(correct) * len(y) / 100
            n += len(y)
    tree.train(was)
    if distributed:
        torch.distributed.all_reduce(correct)
        torch.distributed.all_reduce(n)
    acc = (correct.round() * 100 / n).tolist()  # round: counts are integers, percentages exact
    per = [{"top1": a[0], "top5": a[1]} for a in acc]
    return {"heads": per[:heads], "ensemble": per[heads], "n": int(n.item())}


# ------------------------------------------------------------------------------- the run

class _Run:
    """State of one training run (one per process under DDP)."""

    def __init__(self, recipe: dict[str, Any], name: str, output: str | None, resume: bool,
                 log: Callable[[str], None]):
        from timm.utils import random_seed
        from timm.utils.distributed import init_distributed_device_so

        self.recipe = recipe
        dev = init_distributed_device_so("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev["device"])
        self.rank, self.world, self.distributed = dev["global_rank"], dev["world_size"], dev["distributed"]
        self.primary = self.rank == 0
        self.log = log if self.primary else (lambda message: None)
        self.out = self._output(name, output, resume)
        random_seed(recipe["seed"], self.rank)
        self.splits = D.splits(recipe)
        self.state: dict[str, Any] | None = None
        if resume:
            self._check_resume()
            self.tree = HeadTree.load(self.out / "last")
            self.state = torch.load(self.out / "last" / STATE_FILE, map_location="cpu", weights_only=True)
        else:
            self.tree = self._build_tree()

    # -- setup
    def _output(self, name: str, output: str | None, resume: bool) -> Path:
        out = output or self.recipe["output"]
        if out is None and resume:
            found = latest_run(RUNS, f"{name}-", need=f"last/{STATE_FILE}")
            if found is None:
                raise HeadsurgeonError(f"--resume found no run of '{name}' under {RUNS}/; pass --output RUN_DIR")
            out = str(found)
            self.log(f"resuming {out}")
        if out is None:
            out = str(RUNS / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
            if self.distributed:  # one name for all ranks (their clocks can straddle a second)
                box = [out]
                torch.distributed.broadcast_object_list(box, src=0)
                out = box[0]
        path = Path(out)
        if resume and not (path / "last" / STATE_FILE).is_file():
            raise HeadsurgeonError(f"cannot resume '{path}': it has no last/{STATE_FILE} (no finished epoch)")
        if not resume and path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise HeadsurgeonError(f"output '{path}' is not empty; pass --resume to continue that run or choose another --output")
        return path

    def _check_resume(self) -> None:
        try:
            stored = R.flatten(yaml.safe_load((self.out / "recipe.yaml").read_text()), "stored recipe")
            old = R.validate({**R.defaults(), **stored})  # keys added since the run started take their defaults
        except (OSError, yaml.YAMLError, HeadsurgeonError) as e:
            raise HeadsurgeonError(f"cannot resume '{self.out}': its recipe.yaml is unreadable ({e})") from None
        changed = R.diff(old, self.recipe)
        if changed:
            raise HeadsurgeonError(f"refusing to resume '{self.out}' with a changed recipe: {'; '.join(changed)} "
                                   f"(start a new run, or undo the change)")

    def _build_tree(self) -> HeadTree:
        r, classes = self.recipe, self.splits.num_classes
        if r["tree"]:
            tree = HeadTree.load(r["tree"])
            cfg = tree.spec.pretrained_cfg
            have = tree.spec.model_args.get("num_classes", cfg.get("num_classes"))
            if have != classes:
                raise HeadsurgeonError(f"tree '{r['tree']}' has {have} classes but dataset '{r['data.dataset']}' has "
                                       f"{classes}; re-split with --num-classes {classes}")
            return tree
        kwargs = dict(r["model_kwargs"], num_classes=classes)
        if r["pretrained"]:
            kwargs["pretrained"] = True
        size = r["data.img_size"]
        return split(r["model"], at=r["split.at"], heads=r["split.heads"], fanout=r["split.fanout"],
                     rescale=r["split.rescale"], branch_init=r["split.branch_init"], weights=r["weights"],
                     seed=r["seed"], input_size=(kwargs.get("in_chans", 3), size, size), **kwargs)

    # -- checkpoints
    def _save_tree_dir(self, target: Path, model: HeadTree, extra: Callable[[Path], None] | None = None) -> None:
        model.save(target, overwrite=True, extra=extra)

    # -- main loop
    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3, NativeScaler, distribute_bn

        r, tree, dev = self.recipe, self.tree, self.device
        cuda = dev.type == "cuda"
        if r["amp"] and not cuda:
            self.log("amp is for CUDA; training in fp32 on CPU")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r["amp"]) if cuda else None
        autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        scaler = NativeScaler() if amp_dtype == torch.float16 else None

        if self.distributed and r["sync_bn"] and cuda:
            from timm.layers import convert_sync_batchnorm
            tree = self.tree = convert_sync_batchnorm(tree)
        tree.to(dev)
        if r["channels_last"]:
            tree.to(memory_format=torch.channels_last)
        # weight decay skips biases, norms and the model's own no_weight_decay() names (HeadTree maps them)
        optimizer = create_optimizer_v2(tree, opt=r["optim.opt"], lr=r["optim.lr"], weight_decay=r["optim.weight_decay"],
                                        momentum=r["optim.momentum"])
        ema = ModelEmaV3(tree, decay=r["ema"]) if r["ema"] else None
        model: Any = tree
        if r["compile"]:
            model = torch.compile(tree, backend=r["compile"] if isinstance(r["compile"], str) else "inductor")
        if self.distributed:
            unused = bool(getattr(tree, "has_unused_parameters", False))  # weights no node reads
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if cuda else None,
                                                              find_unused_parameters=unused)

        data_cfg = self._data_cfg()
        train_loader = D.loader(self.splits.train, r, data_cfg, True, dev, self.distributed)
        evals = {k: D.loader(D.shard(getattr(self.splits, k), self.rank, self.world), r, data_cfg, False, dev)
                 for k in ("val", "test")}
        steps = len(train_loader)
        scheduler = None
        if r["sched.sched"] != "none":
            scheduler, _ = create_scheduler_v2(
                optimizer, sched=r["sched.sched"], num_epochs=r["epochs"], warmup_epochs=r["sched.warmup_epochs"],
                warmup_lr=r["sched.warmup_lr"], min_lr=r["sched.min_lr"], decay_epochs=r["sched.decay_epochs"],
                decay_milestones=r["sched.decay_milestones"], decay_rate=r["sched.decay_rate"],
                step_on_epochs=r["sched.step_on_epochs"], updates_per_epoch=steps)

        start, history, best = 0, [], None
        t_prev = 0.0
        if self.state is not None:
            s = self.state
            optimizer.load_state_dict(s["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(s["scheduler"])
            if scaler is not None and s.get("scaler"):
                scaler.load_state_dict(s["scaler"])
            if ema is not None:
                safetensors.torch.load_model(ema.module, str(self.out / "last" / EMA_FILE), device=str(dev))
            start, history, best, t_prev = s["epoch"], s["history"], s["best"], s["wall_time_s"]
            _set_rng_state(s["rng"][self.rank])
            if self.primary:  # drop lines of an epoch that finished after the last checkpoint
                lines = (self.out / "metrics.jsonl").read_text().splitlines() if (self.out / "metrics.jsonl").exists() else []
                (self.out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:start]))
        elif self.primary:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(yaml.safe_dump(R.nest(self.recipe), sort_keys=False))
        if self.primary:
            self.log(f"training {tree.num_heads} heads of {tree.spec.architecture} on {self.splits.sizes()} "
                     f"samples ({self.splits.num_classes} classes) on {dev}"
                     + (f" x {self.world} processes" if self.distributed else "") + f"; run dir {self.out}")

        end = r["epochs"] if stop_after is None else min(r["epochs"], start + stop_after)
        t0 = time.time() - t_prev
        for epoch in range(start, end):
            if self.distributed:
                train_loader.sampler.set_epoch(epoch)
            try:
                loss, fit = self._train_epoch(model, tree, train_loader, optimizer, scheduler, scaler, ema, autocast, epoch)
            except torch.cuda.OutOfMemoryError:
                raise HeadsurgeonError(f"CUDA out of memory at batch size {r['data.batch_size']} per process; use a smaller "
                                       f"batch, e.g. --set data.batch_size={max(1, r['data.batch_size'] // 2)}") from None
            if self.distributed and not (r["sync_bn"] and cuda):
                distribute_bn(tree, self.world, reduce=True)  # average BN running stats over ranks
            lr = optimizer.param_groups[0]["lr"]  # the lr this epoch ended with (before the epoch step)
            judged = ema.module if ema is not None else tree
            metrics = {k: _evaluate(judged, v, dev, autocast, r["channels_last"], self.distributed) for k, v in evals.items()}
            if scheduler is not None:
                scheduler.step(epoch + 1, max(h["top1"] for h in metrics["val"]["heads"]))
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss, "train_top1": fit,
                   "time_s": round(time.time() - t0, 2), "val": metrics["val"], "test": metrics["test"]}
            history.append(row)
            head = max(range(tree.num_heads), key=lambda h: metrics["val"]["heads"][h]["top1"])
            improved = best is None or metrics["val"]["heads"][head]["top1"] > best["val_top1"]
            if improved:
                best = {"epoch": epoch + 1, "head": head, "val_top1": metrics["val"]["heads"][head]["top1"]}
            rngs = [_rng_state()]
            if self.distributed:
                rngs = [None] * self.world
                torch.distributed.all_gather_object(rngs, _rng_state())
            if self.primary:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                if improved:
                    self._save_tree_dir(self.out / "best", judged)
                state = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict() if scheduler is not None else None,
                         "scaler": scaler.state_dict() if scaler is not None else None, "rng": rngs,
                         "history": history, "best": best, "wall_time_s": time.time() - t0}

                def extra(tmp: Path) -> None:
                    torch.save(state, tmp / STATE_FILE)
                    if ema is not None:
                        safetensors.torch.save_model(ema.module, str(tmp / EMA_FILE))

                self._save_tree_dir(self.out / "last", tree, extra)
                summary = self._summary(history, best, finished=epoch + 1 == r["epochs"], wall=time.time() - t0)
                _write_json(self.out / "summary.json", summary)
                self._log_epoch(row, r["epochs"])
            if self.distributed:
                torch.distributed.barrier()
        summary = self._summary(history, best, finished=len(history) == r["epochs"], wall=time.time() - t0)
        if self.primary and history:
            self._plot(history)
            _write_json(self.out / "summary.json", summary)
        if self.distributed:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return summary

    def _train_epoch(self, model, tree, loader, optimizer, scheduler, scaler, ema, autocast,
                     epoch: int) -> tuple[float, list[float]]:
        """One epoch; returns the mean loss and each head's top-1 on the (augmented, possibly noisy) training
        labels as it went."""
        from tqdm import tqdm

        r, dev = self.recipe, self.device
        steps = len(loader)
        heads = tree.num_heads
        total = torch.zeros((), device=dev)
        hits = torch.zeros(heads, device=dev)
        seen = 0
        model.train()
        bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{r['epochs']}", leave=False,
                   disable=None if self.primary else True, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if r["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                outs = model(x)
                loss = collaborative_loss(outs, y, beta=r["loss.beta"], temperature=r["loss.temperature"],
                                          t2=r["loss.t2"], label_smoothing=r["loss.label_smoothing"])
            if not torch.isfinite(loss).item():
                raise HeadsurgeonError(f"loss is {loss.item()} at epoch {epoch + 1} step {step + 1}; stopped, keeping the "
                                       f"last good checkpoint in {self.out / 'last'} (lower optim.lr, or turn amp off)")
            optimizer.zero_grad(set_to_none=True)
            clip = r["optim.clip_grad"]
            if scaler is not None:
                scaler(loss, optimizer, clip_grad=clip, parameters=tree.parameters())
            else:
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(tree.parameters(), clip)
                optimizer.step()
            if ema is not None:
                ema.update(tree, step=epoch * steps + step)
            if scheduler is not None:
                scheduler.step_update(epoch * steps + step + 1)
            with torch.no_grad():
                total += loss.detach() * len(y)
                hits += torch.stack([(o.argmax(1) == y).sum() for o in outs]).float()
                seen += len(y)
            if self.primary and (step % 10 == 0 or step == steps - 1) and not bar.disable:
                acc = " ".join(f"{a:.0f}" for a in (hits * 100 / seen).tolist())
                bar.set_postfix_str(f"loss {total.item() / seen:.3f} acc/head {acc}")
        bar.close()
        stats = torch.cat([total.reshape(1), torch.tensor([float(seen)], device=dev), hits])
        if self.distributed:
            torch.distributed.all_reduce(stats)
        fit = [round(h * 100 / stats[1].item(), 2) for h in stats[2:].tolist()]
        return stats[0].item() / stats[1].item(), fit

    def _data_cfg(self) -> dict[str, Any]:
        spec = self.tree.spec
        return D.data_config(self.recipe, spec.pretrained_cfg, spec.model_args.get("in_chans", 3))

    def _summary(self, history: list[dict], best: dict | None, finished: bool, wall: float) -> dict[str, Any]:
        row = history[best["epoch"] - 1]
        heads = [{"index": i, "val_top1": v["top1"], "val_top5": v["top5"], "test_top1": t["top1"], "test_top5": t["top5"]}
                 for i, (v, t) in enumerate(zip(row["val"]["heads"], row["test"]["heads"]))]
        ens = {"val_top1": row["val"]["ensemble"]["top1"], "val_top5": row["val"]["ensemble"]["top5"],
               "test_top1": row["test"]["ensemble"]["top1"], "test_top5": row["test"]["ensemble"]["top5"]}
        return {"run": str(self.out), "finished": finished, "epochs_done": len(history), "epochs": self.recipe["epochs"],
                "best_epoch": best["epoch"], "best_head": best["head"], "heads": heads, "ensemble": ens,
                "weights": "ema" if self.recipe["ema"] else "model", "best_dir": "best",
                "num_classes": self.splits.num_classes, "label_names": self.splits.label_names, "samples": self.splits.sizes(),
                "label_noise": self.splits.noise, "device": str(self.device), "world_size": self.world,
                "wall_time_s": round(wall, 1)}

    def _log_epoch(self, row: dict[str, Any], epochs: int) -> None:
        def accs(m):
            return " ".join(f"{h['top1']:.1f}" for h in m["heads"]) + f" | ens {m['ensemble']['top1']:.1f}"

        self.log(f"epoch {row['epoch']}/{epochs} loss {row['train_loss']:.4f} lr {row['lr']:.3g} "
                 f"val top1 {accs(row['val'])}  test top1 {accs(row['test'])}  [{row['time_s']:.0f}s]")

    def _plot(self, history: list[dict]) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.log("matplotlib is not installed; no curves.png")
            return
        epochs = [h["epoch"] for h in history]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, split_ in zip(axes, ("val", "test")):
            for i in range(len(history[0][split_]["heads"])):
                ax.plot(epochs, [h[split_]["heads"][i]["top1"] for h in history], label=f"head {i}")
            ax.plot(epochs, [h[split_]["ensemble"]["top1"] for h in history], "k--", label="ensemble")
            ax.set_title(f"{split_} top-1 (%)")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        tmp = self.out / ".curves.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.out / "curves.png")


def train(recipe: dict[str, Any], name: str = "run", output: str | None = None, resume: bool = False,
          stop_after: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the recipe's tree; returns the run summary (also written to ``OUTPUT/summary.json``).

    ``stop_after`` trains at most that many epochs in this call (a pre-emptible job's slice);
    ``resume`` continues the run in ``output`` from its ``last`` checkpoint.
    """
    if stop_after is not None and stop_after < 1:
        raise HeadsurgeonError(f"stop_after must be >= 1, got {stop_after}")
    run = _Run(recipe, name, output, resume, log)
    if resume and run.state is not None and run.state["epoch"] >= recipe["epochs"]:
        raise HeadsurgeonError(f"run '{run.out}' already finished its {recipe['epochs']} epochs")
    return run.fit(stop_after)
