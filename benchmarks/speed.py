"""Training-step speed of head trees, side by side in one run.

For each model: the single timm model; N independent instances (fork at the input); the
generated tree with simple sharing (first split point, N heads) and with hierarchical sharing
(all split points); and a hand-written eager ``nn.Module`` doing the same forks with the
original timm submodules (what peer implementations do). Every variant trains with SGD on the
same batches; multi-head variants use ``collaborative_loss``. Steps are interleaved
(A B C ... A B C ...) so drift hits every variant alike, and the median is reported.

Also: FLOPs of one training step (forward + backward, torch's ``FlopCounterMode``) relative to
the single model — the physical limit of what sharing saves; memory (CUDA: peak allocated;
CPU: parameters + gradients + tensors saved for backward, measured with saved-tensor hooks);
split time (trace + cut + clone, verification excluded and reported apart) and collapse time.
``--ckpt``: gradient checkpointing instead (``HeadTree.set_grad_checkpointing``): peak training
memory of the single model, the hierarchical tree and the tree with checkpointing, and their step
times, side by side. Peak memory on CPU is torch's ``MemTracker`` (every live tensor: parameters,
gradients, optimizer state, activations, temporaries, including the recomputation in backward)
over one step; on CUDA the peak allocated.

    python benchmarks/speed.py                      # CPU defaults: small inputs and batches
    python benchmarks/speed.py --device cuda --size 224 --batch 64 --amp --channels-last --compile
    python benchmarks/speed.py --ckpt --models resnet50 --size 224 --batch 16 --rounds 3
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import headsurgeon as hs
from headsurgeon.tree import fork

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = [
    ("resnet50", ["layer3", "layer4"], 4),
    ("vit_small_patch16_224", ["blocks.8", "blocks.10"], 4),
    ("convnext_tiny", ["stages.2", "stages.3"], 4),
    ("efficientnet_b0", ["blocks.5", "blocks.6"], 4),
]


# ------------------------------------------------------------------ hand-written eager trees

class _ViTStem(nn.Module):
    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        v = self.vit
        return v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))


class _ViTHead(nn.Module):
    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_head(self.vit.norm(x))


def flat_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as an ordered list of (path, module) at the granularity of its stages/blocks."""
    name = model.pretrained_cfg["architecture"]
    if name.startswith("vit"):
        stem = copy.deepcopy(model)
        stem.blocks, stem.head, stem.norm, stem.fc_norm = nn.Sequential(), nn.Identity(), nn.Identity(), nn.Identity()
        head = copy.deepcopy(model)
        head.blocks, head.patch_embed = nn.Sequential(), nn.Identity()
        head.pos_embed = head.cls_token = None
        return [("stem", _ViTStem(stem))] + [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)] + [("head", _ViTHead(head))]
    parts = []
    for n, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and n in ("stages", "blocks"):
            parts += [(f"{n}.{i}", c) for i, c in enumerate(child)]
        else:
            parts.append((n, child))
    return parts


class HandTree(nn.Module):
    """Eager multi-branch network from timm submodules, forks by the same rescale op."""

    def __init__(self, model: nn.Module, at: list[str], fanout: list[int]):
        super().__init__()
        parts = flat_parts(model)
        names = [n for n, _ in parts]
        cuts = [0] + [names.index(a) for a in at] + [len(parts)]
        self.fanout = fanout
        self.levels = nn.ModuleList()
        for lvl in range(len(cuts) - 1):
            seq = nn.Sequential(*[m for _, m in parts[cuts[lvl]:cuts[lvl + 1]]])
            n = 1 if lvl == 0 else int(torch.tensor(fanout[:lvl]).prod())
            self.levels.append(nn.ModuleList([seq] + [copy.deepcopy(seq) for _ in range(n - 1)]))

    def forward(self, x):
        outs = [self.levels[0][0](x)]
        for lvl in range(1, len(self.levels)):
            f = self.fanout[lvl - 1]
            outs = [seg(fork(outs[j // f], 1.0 / f, False)) for j, seg in enumerate(self.levels[lvl])]
        return outs


# ------------------------------------------------------------------ measurement

def loss_fn(out, y):
    if isinstance(out, list) and len(out) > 1:
        return hs.collaborative_loss(out, y) if hasattr(hs, "collaborative_loss") else sum(F.cross_entropy(z, y) for z in out)
    out = out[0] if isinstance(out, list) else out
    return F.cross_entropy(out, y)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, amp: bool, device: str) -> Callable:
    def step(x, y):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_flops(step: Callable, x, y) -> int:
    with FlopCounterMode(display=False) as fc:
        step(x, y)
    return int(fc.get_total_flops())


def step_memory(model: nn.Module, step: Callable, x, y, device: str) -> int:
    """CUDA: peak allocated during a step. CPU: params + grads + bytes saved for backward."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(x, y)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params * 2 + sum(seen.values())


def bench_model(name: str, at: list[str], heads: int, args) -> dict:
    device = args.device
    torch.manual_seed(0)
    kw = dict(num_classes=10, drop_rate=0.0)
    base = timm.create_model(name, **kw)
    size = (3, args.size, args.size)
    if getattr(base, "_traits", {}).get("fixed_input_size") or base.pretrained_cfg.get("fixed_input_size"):
        kw["img_size"] = args.size
        base = timm.create_model(name, **kw)
    base.eval()

    # split / collapse timings (median of 3; verification and independent init reported apart)
    def timed(fn, n=3):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            r = fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts), r

    t_split, tree = timed(lambda: hs.split(base, at=at, heads=heads, branch_init="copy", verify=False,
                                           input_size=size))
    t_split_ind, _ = timed(lambda: hs.split(base, at=at, heads=heads, branch_init="independent", seed=0,
                                            verify=False, input_size=size), n=1)
    t_split_ver, _ = timed(lambda: hs.split(base, at=at, heads=heads, branch_init="copy", verify=True,
                                            input_size=size), n=1)
    t_collapse, _ = timed(lambda: hs.collapse(tree, heads - 1))

    variants: dict[str, nn.Module] = {
        "single": copy.deepcopy(base),
        f"{heads} instances": hs.split(base, at=["input"], heads=heads, branch_init="copy", verify=False,
                                      input_size=size),
        "tree simple": hs.split(base, at=at[:1], heads=heads, branch_init="copy", verify=False, input_size=size),
        "hand simple": HandTree(copy.deepcopy(base), at[:1], [heads]),
        "tree hierarchical": hs.split(base, at=at, heads=heads, branch_init="copy", verify=False, input_size=size),
        "hand hierarchical": HandTree(copy.deepcopy(base), at, hs.surgery.default_fanout(heads, len(at))),
    }
    steps, flops, mem = {}, {}, {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    for k, m in variants.items():
        m.to(device).train()
        if args.channels_last:
            m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)
        fn = make_step(m, opt, args.amp, device)
        if args.compile:
            m_c = torch.compile(m)
            fn = make_step(m_c, opt, args.amp, device)
        xx = x.to(memory_format=torch.channels_last) if args.channels_last else x
        flops[k] = step_flops(make_step(m, opt, False, device), xx, y) if not args.compile else step_flops(fn, xx, y)
        mem[k] = step_memory(m, fn, xx, y, device)
        for _ in range(args.warmup):
            fn(xx, y)
        steps[k] = (fn, xx)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, (fn, xx) in steps.items():
            sync(device)
            t = time.perf_counter()
            fn(xx, y)
            sync(device)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    single = med["single"]
    rows = {}
    for k in variants:
        rows[k] = {"step_s": med[k], "time_ratio": med[k] / single, "flop_ratio": flops[k] / flops["single"],
                   "memory_mb": mem[k] / 2**20, "params_m": sum(p.numel() for p in variants[k].parameters()) / 1e6}
    goals = {
        "tree_vs_flops": rows["tree hierarchical"]["time_ratio"] / rows["tree hierarchical"]["flop_ratio"],
        "tree_vs_hand_hierarchical": med["tree hierarchical"] / med["hand hierarchical"],
        "tree_vs_hand_simple": med["tree simple"] / med["hand simple"],
        "instances_vs_tree": med[f"{heads} instances"] / med["tree hierarchical"],
    }
    return {"model": name, "at": at, "heads": heads, "input": list(size), "batch": args.batch, "rows": rows,
            "goals": goals, "split_s": t_split, "split_independent_s": t_split_ind, "split_verified_s": t_split_ver,
            "collapse_s": t_collapse}


def peak_memory(model: nn.Module, step: Callable, x, y, device: str, opt) -> dict[str, int]:
    """Peak bytes during one training step (after a first one, so optimizer state exists).

    CPU: torch's ``MemTracker`` follows every tensor storage (parameters, gradients, optimizer state,
    activations, temporaries, the backward pass's recomputation) and reports the peak by kind."""
    step(x, y)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(x, y)
        torch.cuda.synchronize()
        return {"total": torch.cuda.max_memory_allocated()}
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(model, opt)
    with mt:
        step(x, y)
    peak = next(iter(mt.get_tracker_snapshot("peak").values()))
    return {str(k).split(".")[-1].lower(): int(v) for k, v in peak.items()}


def bench_ckpt(name: str, at: list[str], heads: int, args) -> dict:
    """Single model, hierarchical tree, tree with gradient checkpointing (and the single model with
    timm's own checkpointing, for reference): peak memory and interleaved step times."""
    device = args.device
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=10, drop_rate=0.0)
    size = (3, args.size, args.size)
    single_ckpt = copy.deepcopy(base)
    single_ckpt.set_grad_checkpointing(True)
    variants: dict[str, nn.Module] = {
        "single": base,
        "single, timm grad checkpointing": single_ckpt,
        "tree": hs.split(base, at=at, heads=heads, branch_init="copy", verify=False, input_size=size),
        "tree, grad checkpointing": hs.split(base, at=at, heads=heads, branch_init="copy", verify=False,
                                             input_size=size),
    }
    variants["tree, grad checkpointing"].set_grad_checkpointing(True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    steps, mem = {}, {}
    for k, m in variants.items():
        m.to(device).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)
        steps[k] = make_step(m, opt, args.amp, device)
        print(f"  memory: {k} ...", flush=True)
        mem[k] = peak_memory(m, steps[k], x, y, device, opt)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.warmup + args.rounds):
        for k, fn in steps.items():
            sync(device)
            t = time.perf_counter()
            fn(x, y)
            sync(device)
            if r >= args.warmup:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {k: {"step_s": med[k], "steps_s": times[k], "time_vs_single": med[k] / med["single"],
                "time_vs_tree": med[k] / med["tree"], "peak_mb": mem[k]["total"] / 2**20,
                "peak_by_kind_mb": {c: v / 2**20 for c, v in mem[k].items()},
                "memory_vs_single": mem[k]["total"] / mem["single"]["total"],
                "params_m": sum(p.numel() for p in variants[k].parameters()) / 1e6} for k in variants}
    return {"model": name, "at": at, "heads": heads, "input": list(size), "batch": args.batch, "rows": rows}


def render_ckpt(results: list[dict], args, cmd: str) -> str:
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    out = [f"`{cmd}` — {dev}; torch {torch.__version__}, timm {timm.__version__}; batch {args.batch}, "
           f"{args.size}x{args.size}; step: median of {args.rounds} interleaved steps after {args.warmup} warm-up rounds; "
           f"memory: peak over one step" + (" (MemTracker: parameters, gradients, momentum, activations, temporaries)"
                                           if args.device == "cpu" else " (max allocated)") + ".", ""]
    for r in results:
        out += [f"#### {r['model']} `--at {','.join(r['at'])} --heads {r['heads']}`, {r['input'][1]} px, batch {r['batch']}", "",
                "| variant | step (ms) | time / single | time / tree | peak memory (MiB) | memory / single | of which activations (MiB) |",
                "|---|---|---|---|---|---|---|"]
        for k, v in r["rows"].items():
            act = v["peak_by_kind_mb"].get("act")
            out.append(f"| {k} | {1000 * v['step_s']:.0f} | {v['time_vs_single']:.2f} | {v['time_vs_tree']:.2f} | "
                       f"{v['peak_mb']:.0f} | {v['memory_vs_single']:.2f} | {'' if act is None else f'{act:.0f}'} |")
        c = r["rows"]["tree, grad checkpointing"]
        out += ["", f"- tree with checkpointing: memory **{c['memory_vs_single']:.2f}×** the single model's (goal ≤ 1.3) "
                f"at **{c['time_vs_tree']:.2f}×** the tree's step time (goal ≤ 1.35); without checkpointing "
                f"{r['rows']['tree']['memory_vs_single']:.2f}×", ""]
    return "\n".join(out)


def render(results: list[dict], args, cmd: str) -> str:
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    mode = ", ".join(m for m, on in (("bf16 autocast", args.amp), ("channels_last", args.channels_last), ("torch.compile", args.compile)) if on) or "fp32 eager"
    out = [f"### {args.device.upper()}: {mode}", "",
           f"`{cmd}` — {dev}; torch {torch.__version__}, timm {timm.__version__}; batch {args.batch}, "
           f"{args.size}x{args.size}, median of {args.rounds} interleaved steps after {args.warmup} warm-up steps.", ""]
    for r in results:
        g = r["goals"]
        out += [f"#### {r['model']} `--at {','.join(r['at'])} --heads {r['heads']}`", "",
                "| variant | step (ms) | time / single | FLOPs / single | memory (MiB) | params (M) |",
                "|---|---|---|---|---|---|"]
        for k, v in r["rows"].items():
            out.append(f"| {k} | {1000 * v['step_s']:.1f} | {v['time_ratio']:.2f} | {v['flop_ratio']:.2f} | "
                       f"{v['memory_mb']:.0f} | {v['params_m']:.1f} |")
        out += ["",
                f"- tree (hierarchical) time ratio / FLOP ratio: **{g['tree_vs_flops']:.3f}** (goal ≤ 1.05)",
                f"- tree / hand-written: hierarchical **{g['tree_vs_hand_hierarchical']:.3f}**, simple "
                f"**{g['tree_vs_hand_simple']:.3f}** (goal ≤ 1.02)",
                f"- {r['heads']} instances / hierarchical tree: **{g['instances_vs_tree']:.2f}x** (goal ≥ 1.9 for resnet50)",
                f"- split (trace + cut + clone, copied branches): **{r['split_s']:.2f} s**; with independent "
                f"initialisation {r['split_independent_s']:.2f} s; with verification {r['split_verified_s']:.2f} s; "
                f"collapse (incl. its verification) {r['collapse_s']:.2f} s", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--models", default=",".join(c[0] for c in CONFIGS))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's); 1 on a shared, "
                    "busy CPU, where OpenMP threads spin-wait on each other")
    ap.add_argument("--ckpt", action="store_true", help="gradient checkpointing: peak memory and step time")
    ap.add_argument("--json", default=None, help="results file (default benchmarks/results/speed.json, "
                    "speed-ckpt.json with --ckpt)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    cmd = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    results = []
    for name, at, heads in CONFIGS:
        if name in args.models.split(","):
            print(f"benchmarking {name} ...", flush=True)
            results.append((bench_ckpt if args.ckpt else bench_model)(name, at, heads, args))
    text = (render_ckpt if args.ckpt else render)(results, args, cmd.strip())
    print(text)
    args.json = args.json or str(ROOT / "benchmarks" / "results" / ("speed-ckpt.json" if args.ckpt else "speed.json"))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"cmd": cmd, "device": args.device, "results": results}, indent=1))


if __name__ == "__main__":
    main()
