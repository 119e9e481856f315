"""DDP on CPU: two gloo processes under torchrun train the tree and write one set of outputs."""
import json
import os
import socket
import subprocess
import sys

from test_train import TINY, make_folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_gloo(tmp_path):
    root = make_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    sets = [a for kv in [*TINY, "data.dataset=folder", f"data.root={root}"] for a in ("--set", kv)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "headsurgeon", "train", *sets, "-o", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["finished"] and s["epochs_done"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # evaluation is sharded over the ranks and summed exactly: every sample counted once
    assert [(x["val"]["n"], x["test"]["n"]) for x in rows] == [(12, 18), (12, 18)]
    assert (out / "best" / "tree.safetensors").is_file() and (out / "last" / "state.pt").is_file()
    assert r.stdout.count("finished: best head") == 1  # only rank 0 reports
