"""The recipe key ``parallel`` on CPU (gloo): each layout ends where its reference ends, bit for bit.

- ``instances`` (one instance per rank, only logits exchanged) against the same recipe in one process:
  every rank forms the objective from the same logits, and its own instance's gradient is the one the
  single process computes, so nothing is summed in another order;
- ``fsdp`` against ``ddp`` at 2 ranks: both average two gradients (a 2-term sum is commutative and the
  halving exact), the optimizer steps elementwise on shards, and the batch-norm buffers are broadcast
  when DDP broadcasts them;
- resuming under a layout, or under another layout, from a checkpoint (the ``last/`` a kill -9 between
  epochs leaves: ``--stop-after`` writes exactly that) ends where the uninterrupted run ends.

At 4 ranks ``fsdp`` averages 4 gradients in another order than DDP's all-reduce, which is not exact;
``test_fsdp_gradients_at_4_ranks_within_the_error_of_a_4_term_sum`` checks it against that bound.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from headsurgeon.cli import main
from test_train import TINY, make_folder

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
INST = ["split.at=[input]", "split.fanout=null"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(nproc: int, sets: list[str], out: Path, *args: str, nnodes: int = 1, node_rank: int = 0,
         port: int | None = None) -> list[str]:
    flags = [a for kv in sets for a in ("--set", kv)]
    train = ["-m", "headsurgeon", "train", *flags, "-o", str(out), *args]
    if nproc == 1 and nnodes == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port or _port()}", *train]


def _train(tmp: Path, nproc: int, sets: list[str], out: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(_cmd(nproc, sets, out, *args), capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _base(tmp: Path) -> list[str]:
    root = tmp / "imgs"
    if not root.exists():
        make_folder(root)
    return [*TINY, "data.dataset=folder", f"data.root={root}"]


def _same(a: Path, b: Path) -> None:
    """Bit-identical weights, optimizer state, objective modules and per-epoch losses."""
    wa, wb = (safetensors.torch.load_file(str(d / "last" / "tree.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    sa, sb = (torch.load(d / "last" / "state.pt", weights_only=False) for d in (a, b))
    oa, ob = sa["optimizer"], sb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][k])), (i, k)
    objective = [d / "last" / "objective.safetensors" for d in (a, b)]
    assert objective[0].exists() == objective[1].exists()
    if objective[0].exists():
        ga, gb = (safetensors.torch.load_file(str(f)) for f in objective)
        assert all(torch.equal(ga[k], gb[k]) for k in ga)
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert [(r["train_loss"], r["val"], r["test"]) for r in rows[0]] == [(r["train_loss"], r["val"], r["test"])
                                                                       for r in rows[1]]


def _stopped_and_resumed(tmp: Path, first: tuple[int, list[str]], then: tuple[int, list[str]], out: Path) -> Path:
    """``first`` (processes, sets) trained for one epoch, then resumed to the end as ``then``."""
    _train(tmp, *first, out, "--stop-after", "1")
    _train(tmp, *then, out, "--resume")
    return out


@pytest.mark.parametrize("objective,heads", [("cl", 2), ("one", 2), ("dml", 4)])
def test_instances_end_where_one_process_ends(tmp_path, objective, heads):
    sets = [*_base(tmp_path), *INST, f"split.heads={heads}", f"loss.objective={objective}"]
    _train(tmp_path, 1, sets, tmp_path / "one")
    r = _train(tmp_path, heads, [*sets, "parallel=instances"], tmp_path / "inst")
    _same(tmp_path / "one", tmp_path / "inst")
    s = json.loads((tmp_path / "inst" / "summary.json").read_text())
    assert s["parallel"] == "instances" and s["world_size"] == heads
    assert r.stdout.count("finished: best head") == 1


def test_instances_resume_and_two_nodes_on_loopback(tmp_path):
    """One process stopped after epoch 1 and resumed as 2 instances, instances stopped and resumed, and 2
    node ranks of one process each (torchrun --nnodes 2 on 127.0.0.1) all end where one process ends."""
    sets = [*_base(tmp_path), *INST, "split.heads=2", "loss.objective=kdcl"]
    inst = [*sets, "parallel=instances"]
    _train(tmp_path, 1, sets, tmp_path / "one")
    _same(tmp_path / "one", _stopped_and_resumed(tmp_path, (1, sets), (2, inst), tmp_path / "cross"))
    _same(tmp_path / "one", _stopped_and_resumed(tmp_path, (2, inst), (2, inst), tmp_path / "again"))
    port = _port()
    nodes = [subprocess.Popen(_cmd(1, inst, tmp_path / "nodes", nnodes=2, node_rank=i, port=port), env=ENV,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    _same(tmp_path / "one", tmp_path / "nodes")


def test_fsdp_ends_where_ddp_ends_and_resumes_under_either(tmp_path):
    """4 heads hierarchical, gradient accumulation over 2 micro-batches (FSDP's no-sync path): fsdp ends
    bit-identical to ddp, and so do fsdp stopped and resumed, and ddp stopped and resumed as fsdp."""
    sets = [*_base(tmp_path), "optim.grad_accum_steps=2", "data.batch_size=4"]
    fsdp = [*sets, "parallel=fsdp"]
    _train(tmp_path, 2, sets, tmp_path / "ddp")
    _train(tmp_path, 2, fsdp, tmp_path / "fsdp")
    _same(tmp_path / "ddp", tmp_path / "fsdp")
    assert json.loads((tmp_path / "fsdp" / "summary.json").read_text())["parallel"] == "fsdp"
    _same(tmp_path / "ddp", _stopped_and_resumed(tmp_path, (2, fsdp), (2, fsdp), tmp_path / "resumed"))
    _same(tmp_path / "ddp", _stopped_and_resumed(tmp_path, (2, sets), (2, fsdp), tmp_path / "cross"))
    # what collapse reads is the gathered tree: the exported model loads strictly and is verified
    r = CliRunner().invoke(main, ["collapse", str(tmp_path / "fsdp"), "-o", str(tmp_path / "model")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_fsdp_evaluates_shards_of_unequal_batch_counts(tmp_path):
    """13 validation images over 2 ranks in batches of 6: one rank's shard has 2 batches, the other's 1.
    Every FSDP forward gathers the shards from every rank, so the rank with fewer batches must pad with
    empty forwards, agreed before the first (agreed after, it hangs); results equal ddp's exactly."""
    sets = [*_base(tmp_path), "split.at=[layer4]", "split.heads=2", "split.fanout=null", "data.val_fraction=0.27", "data.eval_batch_size=6", "log.fit_every=1"]
    _train(tmp_path, 2, sets, tmp_path / "ddp")
    _train(tmp_path, 2, [*sets, "parallel=fsdp"], tmp_path / "fsdp")
    _same(tmp_path / "ddp", tmp_path / "fsdp")
    rows = [json.loads(x) for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    n = rows[-1]["val"]["n"]
    assert -(-(n - n // 2) // 6) != -(-(n // 2) // 6), n  # the case this test is about: unequal batch counts
    assert rows[-1]["fit"] == json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])["fit"]


GRADIENT_CHECK = r'''
import copy, sys, torch, torch.distributed as dist
import headsurgeon as hs
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
dist.init_process_group("gloo"); rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same tree on every rank (timm draws the init from the global RNG)
tree = hs.split("resnet10t", at=["layer3", "layer4"], heads=4, num_classes=3, input_size=(3, 16, 16),
                channels=[8, 16, 32, 64], stem_width=8, seed=0)
plain, ddp = copy.deepcopy(tree), DDP(copy.deepcopy(tree))
for segs in tree.levels:
    for seg in segs:
        fully_shard(seg)
fully_shard(tree)
x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(rank))  # every rank its own batch
for m in (tree, plain, ddp):
    m.train()
    sum(o.logsumexp(1).sum() for o in m(x)).backward()
worst = 0.0
for (name, p), q, d in zip(tree.named_parameters(), plain.parameters(), ddp.module.parameters()):
    total = q.grad.abs()  # sum over the ranks of |g_i|: what the rounding of the sum scales with
    dist.all_reduce(total)
    # |fl(g_1 + ... + g_n) - sum| <= (n - 1) eps sum |g_i| for either order; the two means differ by twice that / n
    bound = 2 * (world - 1) * torch.finfo(torch.float32).eps * total / world
    diff = (p.grad.full_tensor() - d.grad).abs()
    assert (diff <= bound).all(), (name, (diff - bound).max().item())
    worst = max(worst, (diff / bound.clamp_min(1e-30)).max().item())
print("OK", worst)
'''


def test_fsdp_gradients_at_4_ranks_within_the_error_of_a_4_term_sum(tmp_path):
    script = tmp_path / "grad.py"
    script.write_text(GRADIENT_CHECK)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--master_addr=127.0.0.1",
                        f"--master_port={_port()}", str(script)], capture_output=True, text=True, timeout=600,
                       env=ENV, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("OK") == 4, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("sets,match", [
    (["parallel=instances"], "shares a trunk"),
    ([*INST, "split.heads=2", "parallel=fsdp", "ema=true"], "does not shard a weight EMA"),
    ([*INST, "split.heads=2", "parallel=instances", "loss.objective=pcl"], "does not shard a weight EMA"),
    ([*INST, "split.heads=2", "parallel=instances", "optim.clip_grad=1.0"], "clip each instance"),
    (["parallel=sharded"], "parallel"),
])
def test_combinations_that_cannot_work_are_one_line_before_training(tmp_path, sets, match):
    flags = [a for kv in [*TINY, *sets] for a in ("--set", kv)]
    r = CliRunner().invoke(main, ["recipe", "--check", *flags])
    assert r.exit_code != 0 and match in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_instances_needs_one_rank_per_instance(tmp_path):
    sets = [*_base(tmp_path), *INST, "split.heads=4", "parallel=instances"]
    r = CliRunner().invoke(main, ["train", *[a for kv in sets for a in ("--set", kv)], "-o", str(tmp_path / "one")])
    assert r.exit_code != 0 and "torchrun --nproc_per_node" in r.output and not (tmp_path / "one").exists(), r.output
    p = subprocess.run(_cmd(2, sets, tmp_path / "two"), capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path)
    assert p.returncode != 0 and "has 4 instances but the job has 2 process(es)" in p.stdout + p.stderr
    assert not (tmp_path / "two").exists()
    assert "Traceback" not in p.stdout
