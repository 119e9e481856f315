"""Per-rank memory of the three layouts (recipe ``parallel``) for a tree of a large timm model.

Each configuration runs the real engine (``headsurgeon.train.build`` + one ``train_epoch`` of a few
steps on synthetic images) under ``torchrun`` and each rank reports, after its last step:

- the bytes it holds of the tree's parameters, gradients and optimizer state (its shard under fsdp,
  its own instance under instances; DTensor shards by their local size, meta tensors as 0): the figure
  the layouts are built to divide by N;
- its peak resident memory (``ru_maxrss``). On a CPU this includes building the whole tree before it is
  sharded or handed out (every rank builds it; rank 0 also keeps a plain CPU copy to save checkpoints
  from), so it falls less than the state does; on CUDA the engine's device peak (``max_memory_allocated``)
  is reported as well.

Usage (the figures in docs/benchmarks.md):
    python benchmarks/parallel_memory.py                    # resnet152, 224 px, 2 ranks, 3 steps, gloo on CPU
    python benchmarks/parallel_memory.py --model vit_base_patch16_224 --at blocks.9,blocks.10
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _folder(root: Path, per_class: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("validation", 1)):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.png")


def _local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    if t is None or t.is_meta:
        return 0
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def worker(a: argparse.Namespace) -> None:
    import resource

    import torch

    from headsurgeon import recipe as R
    from headsurgeon import train as T

    torch.set_num_threads(1)
    recipe, _ = R.load(None, json.loads(a.sets))
    run = T.build(recipe, output=a.run_dir, log=lambda m: None)
    try:
        if run.proc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        T.train_epoch(run, 0)
        saved = run.layout.saved_tree(run.tree)  # collective: every rank takes part, the primary gets the tree
        params = {id(p): p for p in run.task.parameters()}.values()
        out = {"rank": run.proc.rank, "mode": run.layout.mode,
               "params": sum(_local_bytes(p) for p in params),
               "grads": sum(_local_bytes(p.grad) for p in params),
               "optimizer": sum(_local_bytes(v) for st in run.optimizer.state.values() for v in st.values()
                                if isinstance(v, torch.Tensor)),
               "tree_params": sum(p.numel() for p in saved.parameters()) if saved is not None else None,
               "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "cuda_peak": torch.cuda.max_memory_allocated() if run.proc.device.type == "cuda" else None}
    finally:
        if run.proc.primary:
            run.dir.unlock()
    Path(a.report, f"rank{run.proc.rank}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet152")
    ap.add_argument("--at", default="layer3,layer4", help="split points of the shared tree (ddp vs fsdp)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per rank (batch 2 per rank)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "parallel_memory.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sets", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    n = a.ranks
    tmp = Path(tempfile.mkdtemp(prefix="parallel-memory-"))
    _folder(tmp / "imgs", per_class=a.steps * n)  # 2 classes x steps*n images: `steps` batches of 2 per rank
    at = a.at.split(",")
    base = [f"model={a.model}", "model_kwargs={}", f"data.img_size={a.img_size}", "data.batch_size=2",
            "data.dataset=folder", f"data.root={tmp / 'imgs'}", "data.workers=0", "epochs=1", "sched.warmup_epochs=0",
            "optim.opt=sgd", "optim.lr=0.01"]
    shared = [f"split.at=[{', '.join(at)}]", f"split.heads={2 ** len(at)}", "split.fanout=null"]
    inst = ["split.at=[input]", f"split.heads={n}", "split.fanout=null"]
    configs = [("shared tree", "ddp", shared), ("shared tree", "fsdp", shared),
               ("instances", "ddp", inst), ("instances", "instances", inst)]
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for tree, mode, sets in configs:
        report = tmp / f"{tree.replace(' ', '-')}-{mode}"
        report.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
               f"--master_port={_port()}", __file__, "--worker", "--sets",
               json.dumps([*base, *sets, f"parallel={mode}"]), "--run-dir", str(report / "run"), "--report", str(report)]
        print(f"{tree}, {mode}: running {n} ranks ...", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        if r.returncode:
            print(r.stdout[-3000:], r.stderr[-3000:])
            return 1
        ranks = [json.loads((report / f"rank{i}.json").read_text()) for i in range(n)]
        rows.append({"tree": tree, "mode": mode, "ranks": ranks})
    out = {"model": a.model, "at": at, "img_size": a.img_size, "ranks": n, "steps": a.steps, "batch_per_rank": 2,
           "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(table(out))
    return 0


def table(res: dict) -> str:
    mib = 2 ** 20
    lines = [f"{res['model']} at {res['img_size']} px, {res['ranks']} ranks (gloo), batch 2 per rank, SGD with momentum, "
             f"after {res['steps']} steps; per rank, the largest over ranks:", "",
             "| tree | parallel | tree parameters | params + grads + optimizer per rank (MiB) | vs ddp | peak RSS per rank (MiB) | vs ddp |",
             "|---|---|---|---|---|---|---|"]
    ref = {}
    for row in res["rows"]:
        state = max(r["params"] + r["grads"] + r["optimizer"] for r in row["ranks"])
        rss = max(r["peak_rss"] for r in row["ranks"])
        n_params = next(r["tree_params"] for r in row["ranks"] if r["tree_params"] is not None)
        if row["mode"] == "ddp":
            ref[row["tree"]] = (state, rss)
        s0, r0 = ref[row["tree"]]
        lines.append(f"| {row['tree']} | {row['mode']} | {n_params / 1e6:.1f} M | {state / mib:,.0f} | {state / s0:.2f} | "
                     f"{rss / mib:,.0f} | {rss / r0:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
