"""Heterogeneous peers: a tree whose heads are whole models of different timm architectures, forked
at the input. Every check is against timm's own eager models or a reload by timm alone."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from click.testing import CliRunner

import headsurgeon as hs
from headsurgeon import recipe as R
from headsurgeon import train as T
from headsurgeon.cli import main
from headsurgeon.objectives import get
from headsurgeon.spec import Peer
from headsurgeon.verify import max_abs_diff

# `== 0` below: a head's graph (or a reload) runs its eager model's ops on the same input in this process,
# so the same kernels: exact on any processor.
NARROW = {"channels": [8, 16, 32, 64], "stem_width": 8}
MODELS = ["resnet10t", "mobilenetv3_small_050"]
SIZE = (3, 32, 32)
SEED = 5


@pytest.fixture(scope="module")
def peers():
    """Split once (tracing and verifying two models is the slow part); tests take copies."""
    torch.manual_seed(0)
    return hs.split(MODELS, at="input", num_classes=3, input_size=SIZE, seed=SEED, peer_kwargs=[NARROW, {}])


def _x(seed=1):
    return torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(seed))


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def test_heads_are_the_eager_peers(peers):
    """Head i of the un-trained tree is model i as timm creates it (peer 0 from the global RNG, peer j
    under seed + j): the same state dict and, in both modes, the same logits."""
    tree = copy.deepcopy(peers)
    torch.manual_seed(0)
    eager = [timm.create_model(MODELS[0], num_classes=3, **NARROW)]
    torch.manual_seed(SEED + 1)
    eager.append(timm.create_model(MODELS[1], num_classes=3))
    assert tree.num_heads == 2 and tree.spec.fanout == (2,) and tree.spec.at == ("input",)
    assert sum(t.numel() for t in tree.levels[0][0].state_dict().values()) == 0  # the trunk passes the image on
    for h, m in enumerate(eager):
        mine, theirs = tree.head_state_dict(h), m.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    x = _x()
    for train in (False, True):  # train mode: batch statistics, and the running stats move alike
        t, ms = copy.deepcopy(tree).train(train), [copy.deepcopy(m).train(train) for m in eager]
        with torch.no_grad():
            outs = t(x)
            for h, m in enumerate(ms):
                assert max_abs_diff(outs[h], m(x)) == 0, (train, h)
        assert all(torch.equal(a, b) for h, m in enumerate(ms) for a, b in
                   zip(t.head_state_dict(h).values(), m.state_dict().values()))
    assert max_abs_diff(tree.eval()(x)[0], tree(x)[1]) > 0  # two different models


def test_save_load_collapse_round_trip(peers, tmp_path):
    tree = copy.deepcopy(peers).eval()
    tree.save(tmp_path / "t")
    spec = json.loads((tmp_path / "t" / "spec.json").read_text())
    assert spec["format"] == 2 and [p["architecture"] for p in spec["peers"]] == MODELS
    loaded = hs.HeadTree.load(tmp_path / "t").eval()
    assert loaded.spec == tree.spec and "1 mobilenetv3_small_050" in loaded.describe()
    x = _x()
    with torch.no_grad():
        want = tree(x)
        assert all(max_abs_diff(a, b) == 0 for a, b in zip(loaded(x), want))
        for h, cls in enumerate(("ResNet", "MobileNetV3")):
            m = loaded.collapse(h)
            assert type(m).__name__ == cls and m.pretrained_cfg["architecture"] == MODELS[h]
            assert max_abs_diff(m(x), want[h]) == 0


def test_one_model_specs_are_unchanged_and_old_ones_load(peers):
    """A one-model spec writes no ``peers`` (format 1, readable by headsurgeon before peers) and answers
    peer(i) with its own model for every head; a peers spec must be consistent."""
    spec = hs.SplitSpec(architecture="resnet10t", model_args={"num_classes": 3, **NARROW}, at=["input"], heads=2,
                        fanout=[2], unused=["x"], no_weight_decay=["y"], source="resnet10t")
    raw = json.loads(spec.to_json())
    assert "peers" not in raw and raw["format"] == 1 and not spec.hetero
    old = hs.SplitSpec.from_json(json.dumps(raw))
    assert old == spec and old.peer(1) == old.peer(0) == Peer(
        architecture="resnet10t", model_args=spec.model_args, source="resnet10t", unused=["x"], no_weight_decay=["y"])
    bad = json.loads(peers.spec.to_json())
    bad["peers"][0]["architecture"] = "resnet18"
    with pytest.raises(hs.HeadsurgeonError, match="peers\\[0\\] must repeat"):
        hs.SplitSpec.from_json(json.dumps(bad))
    bad = json.loads(peers.spec.to_json())
    bad["format"] = 3
    with pytest.raises(hs.HeadsurgeonError, match="newer headsurgeon"):
        hs.SplitSpec.from_json(json.dumps(bad))


def test_weight_decay_and_layer_groups_per_peer():
    """no_weight_decay and the layer-decay groups come from each peer's own model; layer ids are shifted
    so that every peer's classifier is the tree's last group."""
    from timm.models import group_parameters

    vit = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    tree = hs.split(["resnet10t", "vit_tiny_patch16_224"], at="input", num_classes=3, input_size=SIZE,
                    peer_kwargs=[NARROW, vit])
    assert tree.no_weight_decay() == {"levels.1.1.pos_embed", "levels.1.1.cls_token"}
    eager = [timm.create_model("resnet10t", num_classes=3, **NARROW), timm.create_model("vit_tiny_patch16_224", num_classes=3, **vit)]
    own = [group_parameters(m, m.group_matcher(), reverse=True) for m in eager]
    last = max(max(o.values()) for o in own)
    layer = tree.group_matcher()
    for h, o in enumerate(own):
        shift = last - max(o.values())
        assert all(layer(f"levels.1.{h}.{n}") == i + shift for n, i in o.items())
    assert layer("levels.1.0.fc.weight") == layer("levels.1.1.head.weight") == last


@pytest.mark.parametrize("name", ["cl", "dml", "kdcl", "one"])
def test_every_objective_trains_every_peer(peers, name):
    """One step of each objective on a peer tree: a finite loss and a gradient in every peer. ONE's gate
    pools the trunk output at the fork, which for peers (as for instances) is the image."""
    tree = copy.deepcopy(peers).train()
    x, y = _x(), torch.tensor([0, 1, 2, 0])
    objective = get(name)
    box = {}
    tree.levels[0][0].register_forward_hook(lambda m, i, out: box.__setitem__("fork", out[0]))
    logits = tree(x)
    modules = objective.make_modules(SIZE[0], tree.num_heads, 3) if name == "one" else None
    out = objective(logits, y, box["fork"] if name == "one" else None, modules)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for h in range(2):
        grads = [p.grad for p in tree.levels[1][h].parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, h


def test_recipe_run_collapse_reload(tmp_path):
    """A recipe with two different tiny peers trains (ONE, whose gate reads the fork); head 1 collapses
    into its own architecture and timm reloads it from the folder with the tree's logits."""
    from headsurgeon.pipeline import collapse_dir

    flat, _ = R.load(None, ["model=[resnet10t, mobilenetv3_small_050]",
                            "model_kwargs=[{channels: [8, 16, 32, 64], stem_width: 8}, {}]", "loss.objective=one",
                            "data.img_size=8", "data.folds=10", "data.train_fraction=0.1", "data.val_fraction=0.05",
                            "data.batch_size=16", "epochs=1", "sched.warmup_epochs=0"])
    assert flat.split.at == ["input"] and flat.split.heads == 2
    lines = []
    s = T.train(flat, output=str(tmp_path / "run"), log=lines.append)
    assert s["finished"] and any("heads of resnet10t + mobilenetv3_small_050" in m for m in lines)
    out, head = collapse_dir(tmp_path / "run", 1, tmp_path / "h1", log=lambda m: None)
    model = timm.create_model(f"local-dir:{out.resolve()}", pretrained=True).eval()
    assert type(model).__name__ == "MobileNetV3" and head == 1
    tree = hs.HeadTree.load(tmp_path / "run" / "best").eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert max_abs_diff(model(x), tree(x)[1]) == 0
    card = (out / "README.md").read_text()
    assert "architecture: mobilenetv3_small_050" in card and "head 0 `resnet10t`, head 1 `mobilenetv3_small_050` (this model)" in card
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [3, 8, 8] and cfg["mean"] == list(timm.create_model("resnet10t").pretrained_cfg["mean"])


def test_cli_split_and_collapse(tmp_path):
    code, out = _cli("split", ",".join(MODELS), "--at", "input", "--num-classes", "3", "--input-size", "3,32,32",
                     "--model-kwargs", "0:channels=[8,16,32,64] 0:stem_width=8", "-o", tmp_path / "t")
    assert code == 0, out
    assert "1 mobilenetv3_small_050" in out and "per head: 0 resnet10t" in out
    code, out = _cli("collapse", tmp_path / "t", "--head", "1", "-o", tmp_path / "h1")
    assert code == 0 and "-> mobilenetv3_small_050" in out, out
    model = timm.create_model(f"local-dir:{(tmp_path / 'h1').resolve()}", pretrained=True).eval()
    tree = hs.HeadTree.load(tmp_path / "t").eval()
    with torch.no_grad():
        assert max_abs_diff(model(_x()), tree(_x())[1]) == 0
    code, out = _cli("nodes", ",".join(MODELS), "--num-classes", "3", "--input-size", "3,32,32")
    assert code == 0 and "split them only at the input" in out and "mobilenetv3_small_050" in out, out
    code, out = _cli("split", "resnet10t", "--at", "input", "-o", tmp_path / "u")  # --heads: only a list implies it
    assert code == 1 and "Error: --heads is required for one model" in out and not (tmp_path / "u").exists(), out


@pytest.mark.parametrize("args, match", [
    (["--at", "layer3"], "split them at 'input', not layer3"),
    (["--at", "input", "--heads", "3"], "give 2 heads, one each, but heads is 3"),
    (["--at", "input", "--model-kwargs", "1:num_classes=4"], "resnet10t has 3, mobilenetv3_small_050 has 4 classes"),
    (["--at", "input", "--model-kwargs", "1:in_chans=1"], "resnet10t takes 3, mobilenetv3_small_050 takes 1"),
    (["--at", "input", "--model-kwargs", "2:drop_rate=0.1"], "there are peers 0..1"),
    (["--at", "input", "--branch-init", "copy"], "cannot be copies of each other"),
])
def test_bad_combinations_are_one_line(tmp_path, args, match):
    code, out = _cli("split", ",".join(MODELS), "--num-classes", "3", "--input-size", "3,32,32", *args,
                     "-o", tmp_path / "t")
    lines = [x for x in out.strip().splitlines() if x.startswith("Error:")]
    assert code == 1 and len(lines) == 1 and match in lines[0] and "Traceback" not in out, out
    assert not (tmp_path / "t").exists()


def test_unknown_untraceable_and_unrunnable_peers(tmp_path):
    code, out = _cli("split", "resnet10t,mobilenetv3_smal_050", "--at", "input", "-o", tmp_path / "t")
    assert code == 1 and "unknown timm model 'mobilenetv3_smal_050'; did you mean mobilenetv3_small_050" in out, out
    code, out = _cli("split", "resnet10t,", "--at", "input", "-o", tmp_path / "t")
    assert code == 1 and "'resnet10t,' has an empty model name" in out, out
    assert not (tmp_path / "t").exists()
    bad = timm.create_model("resnet10t", num_classes=3, **NARROW)
    orig = bad.layer2[0].forward
    bad.layer2[0].forward = lambda x: orig(x) if x.sum() > 0 else orig(-x)  # data-dependent control flow
    good = timm.create_model("mobilenetv3_small_050", num_classes=3)
    with pytest.raises(hs.HeadsurgeonError, match="^peer 1 \\(ResNet\\): cannot trace .* in module 'layer2.0'"):
        hs.split([good, bad], input_size=SIZE)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, depth=1)  # fixed 224 input
    with pytest.raises(hs.HeadsurgeonError, match="^peer 1 \\(VisionTransformer\\): VisionTransformer cannot run on "
                                                  "input size 3x32x32 .*its own: 3x224x224"):
        hs.split([good, vit], input_size=SIZE)
    with pytest.raises(hs.HeadsurgeonError, match="at least two"):
        hs.split(["resnet10t"], at="input")
    with pytest.raises(hs.HeadsurgeonError, match="cannot share it"):
        hs.split(MODELS, weights=tmp_path / "w.safetensors")


def test_recipe_refuses_bad_peer_keys():
    for sets, match in ((["split.at=[layer3]"], "'split.at' must be [input]"),
                        (["split.heads=3"], "'split.heads' is 3 but 'model' lists 2 models"),
                        (["model_kwargs=[{}]"], "lists 1 mappings for 2 models"),
                        (["split.fanout=[1, 2]"], "fork once at the input")):
        with pytest.raises(hs.HeadsurgeonError, match=match.replace("[", "\\[").replace("]", "\\]")):
            R.load(None, ["model=resnet10t,mobilenetv3_small_050", *sets])
    with pytest.raises(hs.HeadsurgeonError, match="'model_kwargs' is a list .* but 'model' is one name"):
        R.load(None, ["model=resnet10t", "model_kwargs=[{}, {}]"])
    with pytest.raises(hs.HeadsurgeonError, match="lists 1 model"):
        R.load(None, ["model=[resnet10t]"])
