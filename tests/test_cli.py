"""The CLI is a thin shell: the documented flow works and bad input gives one clear line."""
import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from headsurgeon.cli import main
from headsurgeon.verify import max_abs_diff


def _run(*args, ok=True):
    res = CliRunner().invoke(main, list(args))
    if ok:
        assert res.exit_code == 0, res.output
    return res


def test_split_collapse_local_dir_flow(tmp_path):
    """The issue's acceptance flow: resnet50 split at layer3,layer4, head 2 collapsed and reloaded."""
    t, out = tmp_path / "t", tmp_path / "out"
    res = _run("split", "resnet50", "--at", "layer3,layer4", "--heads", "4", "--num-classes", "10", "-o", str(t))
    assert "level 2: 4 x [layer4 -> output]" in res.output and "FLOPs" in res.output
    res = _run("collapse", str(t), "--head", "2", "-o", str(out))
    assert "local-dir:" in res.output
    from headsurgeon import HeadTree

    tree = HeadTree.load(t).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = tree(x)[2]
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch, timm\n"
        f"m = timm.create_model('local-dir:{out}', pretrained=True).eval()\n"
        "assert type(m).__name__ == 'ResNet' and m.num_classes == 10\n"
        f"torch.save(m(torch.load('{tmp_path / 'x.pt'}')), '{tmp_path / 'y.pt'}')\n"
        "assert 'headsurgeon' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert max_abs_diff(torch.load(tmp_path / "y.pt"), want) <= 1e-5


def test_nodes_lists_feature_modules_first():
    res = _run("nodes", "resnet18", "--input-size", "3,64,64")
    lines = res.output.splitlines()
    assert lines[0].startswith("resnet18:")
    i = lines.index("-- timm feature_info modules")
    assert [ln.split()[0] for ln in lines[i + 1:i + 6]] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert any(ln.startswith("layer3.1 ") for ln in lines)


def test_nodes_lists_only_real_module_paths():
    # ViT's traced graph has root-level ops (getattr, eq, _assert) whose qualnames are not modules
    from timm import create_model
    res = _run("nodes", "test_vit", "--all", "--input-size", "3,32,32")
    lines = res.output.splitlines()
    listed = [ln.split()[0] for ln in lines[lines.index(next(l for l in lines if l.startswith("-- other"))) + 1:]]
    modules = dict(create_model("test_vit").named_modules())
    assert "patch_embed.proj" in listed and "head" in listed
    assert [p for p in listed if p not in modules] == []


def test_split_options(tmp_path):
    t = tmp_path / "t"
    _run("split", "resnet18", "--at", "input", "--heads", "2", "--no-rescale", "--branch-init", "copy",
         "--model-kwargs", "drop_path_rate=0.1", "--input-size", "3,32,32", "--seed", "3", "-o", str(t))
    spec = json.loads((t / "spec.json").read_text())
    assert spec["rescale"] is False and spec["branch_init"] == "copy" and spec["at"] == ["input"]
    assert spec["model_args"]["drop_path_rate"] == 0.1


@pytest.mark.parametrize("args,needle", [
    (["split", "resnet18", "--at", "layer5", "--heads", "2"], "unknown split point 'layer5'"),
    (["split", "resnet18", "--at", "layer4,layer3", "--heads", "4"], "forward order"),
    (["split", "resnet18", "--at", "layer3,layer4", "--heads", "4", "--fanout", "2,3"], "does not match"),
    (["split", "nosuchnet", "--at", "layer3", "--heads", "2"], "unknown timm model"),
    (["split", "resnet18", "--at", "layer3", "--heads", "2", "--model-kwargs", "oops"], "key=value"),
    (["split", "resnet18", "--at", "layer3", "--heads", "2", "--weights", "/nonexistent.safetensors"], "does not exist"),
    (["collapse", "/nonexistent-dir"], "not a directory"),
    (["split", "resnet18", "--at", "layer3", "--heads", "2", "--model-kwargs", "channels=[8, 16]"], "is not valid YAML"),
    (["split", "resnet18", "--at", "layer3", "--heads", "2", "--leaf-module", "BasicBlock"], "is not module:Class"),
    (["split", "resnet18", "--at", "layer3", "--heads", "2", "--leaf-module", "timm.models.resnet:Nope"],
     "cannot import leaf module class 'timm.models.resnet:Nope'"),
    (["split", "resnet18", "--at", "layer3", "--heads", "2", "--leaf-module", "timm.models.resnet:create_classifier"],
     "is not a torch.nn.Module class"),
])
def test_bad_input_one_line_no_traceback_nothing_written(tmp_path, args, needle):
    out = tmp_path / "o"
    res = CliRunner().invoke(main, args + ["-o", str(out)])
    assert res.exit_code != 0
    msg = res.output.strip()
    assert needle in msg and len(msg.splitlines()) == 1 and "Traceback" not in msg
    assert not out.exists() and not any(tmp_path.iterdir())


G4 = ["--model-kwargs", "embed_dim=32", "--model-kwargs", "depth=1", "--model-kwargs", "num_heads=2",
      "--model-kwargs", "head_dim=16", "--model-kwargs", "intermediate_size=64", "--num-classes", "5",
      "--input-size", "3,32,32"]


def test_leaf_module_makes_an_untraceable_model_splittable(tmp_path):
    """gemma4_vit's encoder has data-dependent control flow: the error names the flag that fixes it, and
    with the encoder kept whole the model splits into instances and a head collapses back to timm exactly."""
    t, out = tmp_path / "t", tmp_path / "out"
    res = _run("split", "gemma4_vit_167m", "--at", "input", "--heads", "2", *G4, "-o", str(t), ok=False)
    msg = res.output.strip()
    assert res.exit_code != 0 and len(msg.splitlines()) == 1 and not t.exists()
    assert "in module 'encoder' (Gemma4VitEncoder)" in msg and "--leaf-module timm.models.gemma4_vit:Gemma4VitEncoder" in msg
    leaf = ["--leaf-module", "timm.models.gemma4_vit:Gemma4VitEncoder"]
    res = _run("nodes", "gemma4_vit_167m", *G4, *leaf)
    assert any(ln.startswith("encoder ") for ln in res.output.splitlines())
    _run("split", "gemma4_vit_167m", "--at", "input", "--heads", "2", *G4, *leaf, "-o", str(t))
    assert json.loads((t / "spec.json").read_text())["leaf_modules"] == ["timm.models.gemma4_vit:Gemma4VitEncoder"]
    _run("collapse", str(t), "--head", "1", "-o", str(out))  # reloads the tree (spec's leaf modules), verifies logits
    import timm
    from headsurgeon import HeadTree

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = HeadTree.load(t).eval()(x)[1]
        got = timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x)
    assert max_abs_diff(got, want) <= 1e-5


def test_collapse_bad_head_and_unreadable_tree(tmp_path):
    t = tmp_path / "t"
    _run("split", "resnet18", "--at", "layer4", "--heads", "2", "--input-size", "3,32,32", "-o", str(t))
    res = _run("collapse", str(t), "--head", "5", "-o", str(tmp_path / "o"), ok=False)
    assert res.exit_code != 0 and "head 5 does not exist" in res.output and not (tmp_path / "o").exists()
    (tmp_path / "empty").mkdir()
    res = _run("collapse", str(tmp_path / "empty"), ok=False)
    assert res.exit_code != 0 and "not a head tree directory" in res.output


def test_console_script_exit_code(tmp_path):
    exe = [sys.executable, "-c", "from headsurgeon.cli import main; main()"]
    proc = subprocess.run(exe + ["split", "resnet18", "--at", "layer9", "--heads", "2"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: unknown split point") and "Traceback" not in proc.stderr


def test_pretrained_offline_fails_with_one_clear_line(tmp_path):
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    exe = [sys.executable, "-c", "from headsurgeon.cli import main; main()"]
    proc = subprocess.run(exe + ["split", "resnet18", "--at", "layer4", "--heads", "2", "--pretrained", "-o", "t"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert proc.returncode == 1 and len(err) == 1 and "Traceback" not in proc.stderr
    assert "cannot download or read the pretrained weights of 'resnet18'" in err[0] and "--weights FILE" in err[0]
    assert not (tmp_path / "t").exists()


TINY = ["resnet10t", "--model-kwargs", "channels=[8,16,32,64] stem_width=8", "--num-classes", "3", "--input-size", "3,16,16"]


def test_unreadable_weights_file_is_one_line(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"")  # str(EOFError()) is empty: the message must not index its first line
    res = _run("split", *TINY, "--at", "layer4", "--heads", "2", "--weights", str(tmp_path / "w.pth"),
               "-o", str(tmp_path / "o"), ok=False)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert res.output.startswith("Error: cannot read weights file") and "(EOFError)" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_outputs_that_would_delete_the_input_are_refused(tmp_path):
    t = tmp_path / "t"
    _run("split", *TINY, "--at", "layer4", "--heads", "2", "-o", str(t))
    before = {p.name: p.read_bytes() for p in t.iterdir()}
    for out in (t, tmp_path):  # the source, or a folder holding it
        res = _run("collapse", str(t), "-o", str(out), "--overwrite", ok=False)
        assert res.exit_code == 1 and "is the folder collapse reads from" in res.output, res.output
    res = _run("split", *TINY, "--at", "layer4", "--heads", "2", "--weights", str(t / "tree.safetensors"),
               "-o", str(t), "--overwrite", ok=False)
    assert res.exit_code == 1 and "holds the --weights file" in res.output, res.output
    assert {p.name: p.read_bytes() for p in t.iterdir()} == before
