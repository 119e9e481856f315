"""The checks that need an accelerator, as one short script (``benchmarks/gpu_check.sh`` runs it).

Each check trains a few steps of a 4-head ``resnet50`` tree (``--at layer3,layer4``) with the
collaborative objective and records what it measured; a check that fails is recorded with its
error and the others still run. The JSON goes to ``benchmarks/results/gpu_check-<device>.json``.

* AMP: bf16 and fp16 (fp16 through timm's ``NativeScaler``) training steps, finite losses, step time;
* ``torch.compile`` of the whole tree: compiled step == eager step (outputs), compile time, step time;
* channels_last steps;
* speed at 224 px: single model vs the 4-head tree vs 4 instances (ms per step, peak memory), side by side;
* 2-process NCCL runs of each ``parallel`` layout (ddp, fsdp, instances) through ``torchrun -m headsurgeon
  train`` when two GPUs are visible.

On CPU (``--device cpu --quick``) the same code runs at a small size: AMP bf16 autocast and
``torch.compile`` do run on CPU, which is how the script is tested without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headsurgeon import split  # noqa: E402
from headsurgeon.objectives import get  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _steps(tree, x, y, steps: int, amp: str | None, device: torch.device, channels_last: bool = False,
           model=None) -> dict:
    from timm.utils import NativeScaler

    model = tree if model is None else model
    opt = torch.optim.SGD(tree.parameters(), lr=0.01, momentum=0.9)
    scaler = NativeScaler() if amp == "fp16" and device.type == "cuda" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    objective = get("cl")
    if channels_last:
        tree.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = objective(model(x), y).loss
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler(loss, opt)
        else:
            loss.backward()
            opt.step()
        _sync(device)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    out = {"ms_per_step": round(1000 * sorted(times[1:] or times)[len(times[1:] or times) // 2], 2),
           "losses_finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)), "last_loss": losses[-1]}
    if device.type == "cuda":
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU test of this script)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    size, batch, steps = (64, 4, 3) if a.quick else (224, 64, 12)
    model, at = ("resnet18", ["layer3", "layer4"]) if a.quick else ("resnet50", ["layer3", "layer4"])
    result: dict = {"device": str(device), "name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "model": model, "input": size, "batch": batch, "checks": {}}

    def check(name, fn):
        t = time.time()
        try:
            result["checks"][name] = {"ok": True, **fn()}
        except Exception as e:  # one failing check must not hide the others
            result["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                      "trace": traceback.format_exc()[-1500:]}
        result["checks"][name]["wall_s"] = round(time.time() - t, 1)
        print(name, json.dumps(result["checks"][name])[:300], flush=True)

    def tree_of(heads, where):
        return split(model, at=where if heads > 1 else [], heads=heads, num_classes=10,
                     input_size=(3, size, size)).to(device).train()

    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    check("amp_bf16", lambda: _steps(tree_of(4, at), x, y, steps, "bf16", device))
    if device.type == "cuda":
        check("amp_fp16", lambda: _steps(tree_of(4, at), x, y, steps, "fp16", device))
    check("channels_last", lambda: _steps(tree_of(4, at), x, y, steps, None, device, channels_last=True))

    def compiled():
        tree = tree_of(4, at)
        t = time.time()
        fn = torch.compile(tree)
        with torch.no_grad():
            tree.eval()
            diff = max((a - b).abs().max().item() for a, b in zip(fn(x), tree(x)))
            tree.train()
        first = time.time() - t
        return {"compile_and_first_call_s": round(first, 1), "max_abs_diff_eval": diff,
                **_steps(tree, x, y, steps, None, device, model=fn)}

    check("compile", compiled)

    def speed():
        rows = {}
        for name, heads, where in (("single", 1, []), ("tree4", 4, at), ("instances4", 4, ["input"])):
            rows[name] = _steps(tree_of(heads, where), x, y, steps, "bf16" if device.type == "cuda" else None, device)
        base = rows["single"]["ms_per_step"]
        return {"rows": rows, "tree4_over_single": round(rows["tree4"]["ms_per_step"] / base, 2),
                "instances4_over_single": round(rows["instances4"]["ms_per_step"] / base, 2)}

    check("speed", speed)
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        def layouts():
            """Each recipe `parallel` layout on 2 NCCL ranks (digits, 1 epoch, fp32 so that the layouts'
            weights can be compared: cuDNN's kernels are not bit-reproducible, so this reports differences)."""
            import safetensors.torch

            out = {}
            with tempfile.TemporaryDirectory() as tmp:
                for mode, sets in (("ddp", []), ("fsdp", []), ("ddp-inst2", ["split.at=[input]", "split.heads=2",
                                   "split.fanout=null"]), ("instances", ["split.at=[input]", "split.heads=2",
                                                                          "split.fanout=null"])):
                    flags = [a for kv in ["epochs=1", f"parallel={mode.split('-')[0]}", *sets] for a in ("--set", kv)]
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "headsurgeon",
                           "train", *flags, "-o", f"{tmp}/{mode}"]
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
                    if p.returncode:
                        raise RuntimeError(f"{mode}: {p.stderr[-800:]}")
                    s = json.loads((Path(tmp) / mode / "summary.json").read_text())
                    out[mode] = {"world_size": s["world_size"], "parallel": s["parallel"],
                                 "test_top1": s["heads"][s["best_head"]]["test_top1"]}
                w = {m: safetensors.torch.load_file(f"{tmp}/{m}/last/tree.safetensors") for m in out}
                for a_, b_ in (("ddp", "fsdp"), ("ddp-inst2", "instances")):
                    out[f"{b_}_vs_{a_}_max_weight_diff"] = max((w[a_][k].double() - w[b_][k].double()).abs().max().item()
                                                               for k in w[a_])
            return out

        check("parallel_nccl_2proc", layouts)
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"gpu_check-{device.type}{'-quick' if a.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(c["ok"] for c in result["checks"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    sys.exit(main())
