"""Surgery core: split / HeadTree / collapse / export, each checked numerically against eager."""
import json
import subprocess
import sys

import pydantic
import pytest
import timm
import torch
import torch.nn.functional as F

import headsurgeon as hs
from headsurgeon.verify import max_abs_diff, tolerance
from headsurgeon.surgery import default_fanout

SIZE = (3, 32, 32)

# Two ways of computing one function are compared in float64 (modules and inputs .double()'d after split,
# which probes in float32), within verify.tolerance: 84 float64 ulps of the largest |want| (at least 1),
# room for any summation order.
# An `== 0` compares two runs of the same ops on the same input in this process: the same kernels, exact on
# any processor.


def _close64(got, want):
    assert got.dtype == want.dtype == torch.float64
    return max_abs_diff(got, want) <= tolerance(want, in_dtype=True)


def _x(n=4, size=SIZE):
    return torch.randn(n, *size, generator=torch.Generator().manual_seed(3))


def _resnet(**kw):
    return timm.create_model("resnet18", num_classes=7, **kw)


# ----------------------------------------------------------------------------- structure

def test_fanout_defaults_and_validation():
    assert default_fanout(4, 2) == [2, 2]
    assert default_fanout(4, 1) == [4]
    assert default_fanout(8, 2) == [2, 4]
    assert default_fanout(1, 0) == []
    with pytest.raises(hs.HeadsurgeonError, match="fanout"):
        default_fanout(5, 2)
    with pytest.raises(hs.HeadsurgeonError, match="does not match"):
        hs.split(_resnet(), at=["layer3", "layer4"], heads=4, fanout=[2, 3], input_size=SIZE)


def test_tree_shape_names_and_paths():
    tree = hs.split(_resnet(), at=["layer3", "layer4"], heads=4, branch_init="independent", input_size=SIZE)
    assert tree.num_heads == 4 and [len(lv) for lv in tree.levels] == [1, 2, 4]
    assert tree.path(3) == [0, 1, 3] and tree.path(1) == [0, 0, 1]
    timm_names = set(dict(_resnet().named_parameters()))
    for name, _ in tree.named_parameters():
        assert any(name.endswith("." + t) for t in timm_names), name
    assert any(n.endswith("layer3.0.conv1.weight") for n, _ in tree.named_parameters())
    assert hs.SplitSpec.from_json(tree.spec.to_json()) == tree.spec  # round-trips through JSON
    assert tree.spec.fanout == (2, 2) and tree.spec.architecture == "resnet18"
    with pytest.raises(hs.HeadsurgeonError, match="head 4 does not exist"):
        tree.path(4)


def test_copy_branches_equal_eager_in_eval_and_train():
    model = _resnet()
    tree = hs.split(model, at=["layer3", "layer4"], heads=4, branch_init="copy", input_size=SIZE)
    x = _x()
    model.eval(), tree.eval()
    with torch.no_grad():
        ref = model(x)
        assert all(max_abs_diff(o, ref) == 0 for o in tree(x))
    model.double().train(), tree.double().train()
    with torch.no_grad():
        ref = model(x.double())  # batch statistics
        assert all(_close64(o, ref) for o in tree(x.double()))


def test_each_shared_segment_runs_once():
    tree = hs.split(_resnet(), at=["layer3", "layer4"], heads=4, branch_init="independent", input_size=SIZE)
    calls = []
    for level in tree.levels:
        for seg in level:
            seg.register_forward_hook(lambda m, i, o, seg=seg: calls.append(id(seg)))
    tree(_x())
    assert len(calls) == 1 + 2 + 4 and len(set(calls)) == 7


def test_independent_init_is_timm_init_per_copy():
    tree = hs.split("resnet18", at=["layer3", "layer4"], heads=4, seed=11, num_classes=7, input_size=SIZE)
    assert tree.spec.branch_init == "independent"
    tree.eval()
    with torch.no_grad():
        outs = tree(_x())
    assert all(max_abs_diff(outs[i], outs[j]) > 1e-3 for i in range(4) for j in range(i))
    # copy j of every cloned level holds the weights of a fresh timm instance seeded seed + j
    for j in (1, 3):
        torch.manual_seed(11 + j)
        fresh = timm.create_model("resnet18", num_classes=7).state_dict()
        leaf = tree.levels[2][j].state_dict()
        assert leaf.keys() and all(torch.equal(v, fresh[k]) for k, v in leaf.items())
    mid = tree.levels[1][1].state_dict()
    torch.manual_seed(12)
    fresh = timm.create_model("resnet18", num_classes=7).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in mid.items())


def test_pretrained_like_module_copies_weights_and_warns():
    model = _resnet()
    with pytest.warns(UserWarning, match="identical"):
        tree = hs.split(model, at=["layer4"], heads=2, input_size=SIZE)
    assert tree.spec.branch_init == "pretrained"
    tree.eval()
    with torch.no_grad():
        a, b = tree(_x())
    assert torch.equal(a, b)


def test_weights_file_new_classifier_drawn_per_branch(tmp_path):
    from safetensors.torch import save_file

    src = timm.create_model("resnet18", num_classes=1000)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    tree = hs.split("resnet18", at=["layer4"], heads=2, num_classes=7, weights=tmp_path / "w.safetensors",
                    seed=5, input_size=SIZE)
    assert tree.spec.branch_init == "pretrained"
    l0, l1 = tree.levels[1][0].state_dict(), tree.levels[1][1].state_dict()
    assert torch.equal(l0["layer4.0.conv1.weight"], src.state_dict()["layer4.0.conv1.weight"])
    assert torch.equal(l0["layer4.0.conv1.weight"], l1["layer4.0.conv1.weight"])
    assert not torch.equal(l0["fc.weight"], l1["fc.weight"])  # new classifier: independent per branch
    with pytest.raises(hs.HeadsurgeonError, match="does not exist"):
        hs.split("resnet18", at=["layer4"], heads=2, weights=tmp_path / "missing.safetensors", input_size=SIZE)
    # without weights 'pretrained' has nothing to start from (it would silently draw every branch afresh)
    with pytest.raises(hs.HeadsurgeonError, match="'pretrained' .* but resnet18 is randomly initialised"):
        hs.split("resnet18", at=["layer4"], heads=2, branch_init="pretrained", input_size=SIZE)


# ----------------------------------------------------------------------------- gradients

def _grads_by_original_name(module):
    out = {}
    for name, p in module.named_parameters():
        key = name.split(".", 3)[3] if name.startswith("levels.") else name
        out.setdefault(key, []).append(p.grad.clone())
    return out


@pytest.mark.parametrize("rescale", [True, False])
def test_rescale_gradient_invariant(rescale):
    # an uneven fan-out (2 then 3): with [2, 2] a fork scaled by another level's fan-out would pass unseen
    model = _resnet()
    tree = hs.split(model, at=["layer3", "layer4"], heads=6, fanout=[2, 3], branch_init="copy", rescale=rescale,
                    input_size=SIZE)
    x, y = _x().double(), torch.randint(0, 7, (4,))
    model.double().train(), tree.double().train()
    F.cross_entropy(model(x), y).backward()
    sum(F.cross_entropy(z, y) for z in tree(x)).backward()
    single = dict((n, p.grad) for n, p in model.named_parameters())
    fan = {0: 6, 1: 3, 2: 1}  # heads below one copy at each level
    for name, p in tree.named_parameters():
        level, key = int(name.split(".")[1]), name.split(".", 3)[3]
        want = (1 if rescale else fan[level]) * single[key]
        # float64: the copies' gradients summed at each fork (x3 is not exact), then ~20 backward layers whose
        # reductions (<= 4,608 terms) round in another order: <= n * L * eps64 = 2e-11 of the largest entry, so
        # 1e-10 (24 ulps = 5e-15 seen); a wrong fan-out factor is off by >= 1/6. Not per element: near-zero
        # entries carry their terms' rounding (float32 saw 1.8e-3 relative on one).
        torch.testing.assert_close(p.grad, want, rtol=0, atol=1e-10 * want.abs().max().item())


def test_uneven_fanout_paths_and_collapse():
    """Fan-out 3 then 2: path() and the forward's wiring must agree for every head (with [2, 2] a path
    computed with the wrong level's fan-out gives the same indices)."""
    tree = hs.split("resnet18", at=["layer3", "layer4"], heads=6, fanout=[3, 2], seed=4, num_classes=7,
                    input_size=SIZE).double().eval()
    assert [len(lv) for lv in tree.levels] == [1, 3, 6]
    assert [tree.path(h) for h in range(6)] == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [0, 1, 3], [0, 2, 4], [0, 2, 5]]
    x = _x().double()
    with torch.no_grad():
        outs = tree(x)
        for h in range(6):
            assert _close64(hs.collapse(tree, h)(x), outs[h])


# ----------------------------------------------------------------------------- the checks that guard exactness

def test_split_refuses_a_trace_that_differs_from_eager(monkeypatch):
    """A Python value read in forward is frozen by tracing; the graph then computes something else than
    the eager model, and split must refuse instead of returning a tree that is not the model."""
    from timm.models.resnet import BasicBlock

    calls, orig = [], BasicBlock.forward

    def counting(self, x):
        calls.append(1)
        return orig(self, x) * len(calls)  # a constant in the graph; grows with every eager call

    monkeypatch.setattr(BasicBlock, "forward", counting)
    with pytest.raises(hs.HeadsurgeonError, match="differs from the eager model in (eval|train) mode .*cannot be cut"):
        hs.split(_resnet(), at=["layer3"], heads=2, input_size=SIZE)


def test_collapse_refuses_weights_that_are_not_the_heads(monkeypatch):
    tree = hs.split(_resnet(), at=["layer4"], heads=2, seed=0, branch_init="independent", input_size=SIZE)
    real = hs.HeadTree.head_state_dict
    # the other head's path: loads strictly, computes the wrong logits
    monkeypatch.setattr(hs.HeadTree, "head_state_dict", lambda self, h: real(self, 1 - h))
    with pytest.raises(hs.HeadsurgeonError, match="collapsed head 1 differs from the tree by"):
        tree.collapse(1)

    def nudged(self, h):  # one bias off by 1e-4: ten times the tolerance (1e-5 at these logits, |z| < 1)
        sd = dict(real(self, h))
        sd["fc.bias"] = sd["fc.bias"] + 1e-4
        return sd

    monkeypatch.setattr(hs.HeadTree, "head_state_dict", nudged)
    with pytest.raises(hs.HeadsurgeonError, match="collapsed head 0 differs from the tree"):
        hs.collapse(tree, 0)
    monkeypatch.setattr(hs.HeadTree, "head_state_dict",
                        lambda self, h: {k: v for k, v in real(self, h).items() if k != "fc.weight"})
    with pytest.raises(hs.HeadsurgeonError, match=r"head 0 \(path \[0, 0\]\) does not load into resnet18: .*fc.weight"):
        tree.collapse(0)
    monkeypatch.undo()
    tree.collapse(0)  # and the real weights pass


def test_export_refuses_files_that_reload_with_other_logits(tmp_path, monkeypatch):
    import copy

    import timm.models

    tree = hs.split(_resnet(), at=["layer4"], heads=2, seed=0, branch_init="independent", input_size=SIZE)
    model = hs.collapse(tree, 0)
    real = timm.models.save_for_hf

    def off_by_a_little(m, path, **kw):  # writes weights that are not quite the model's
        other = copy.deepcopy(m)
        with torch.no_grad():
            other.fc.bias.add_(1e-5)
        return real(other, path, **kw)

    monkeypatch.setattr(timm.models, "save_for_hf", off_by_a_little)
    with pytest.raises(hs.HeadsurgeonError, match="the exported model reloads with different logits"):
        hs.export(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary folder left
    monkeypatch.undo()
    hs.export(model, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- variants

def test_plain_model_single_head():
    model = _resnet()
    tree = hs.split(model, at=[], heads=1, input_size=SIZE).eval()
    with torch.no_grad():
        assert max_abs_diff(tree(_x())[0], model.eval()(_x())) == 0
    assert max_abs_diff(hs.collapse(tree, 0)(_x()), model(_x())) == 0


def test_independent_instances_fork_at_input():
    tree = hs.split("resnet18", at=["input"], heads=3, num_classes=7, input_size=SIZE).double().eval()
    assert sum(p.numel() for p in tree.levels[0][0].parameters()) == 0
    x = _x().double()
    with torch.no_grad():
        outs = tree(x)
    assert len(outs) == 3 and max_abs_diff(outs[0], outs[1]) > 0
    for h in range(3):
        assert _close64(hs.collapse(tree, h)(x), outs[h])


def test_fx_node_name_split_point():
    model = _resnet()
    tree = hs.split(model, at=["layer3.1.add"], heads=2, branch_init="copy", input_size=SIZE).eval()
    with torch.no_grad():
        assert all(max_abs_diff(o, model.eval()(_x())) == 0 for o in tree(_x()))
    assert "layer3.1.conv1.weight" in tree.levels[0][0].state_dict()
    assert "layer3.1.bn2.weight" in tree.levels[0][0].state_dict()
    assert "layer4.0.conv1.weight" in tree.levels[1][1].state_dict()


def test_inplace_branch_start_gets_its_own_tensor():
    """resnet's act1 is ReLU(inplace=True): forking on its input must not let siblings share it."""
    model = _resnet()
    tree = hs.split(model, at=["act1"], heads=3, seed=2, branch_init="independent", input_size=SIZE).double()
    assert tree.owns_input[1]
    tree.eval()
    x = _x().double()
    with torch.no_grad():
        outs = tree(x)
    for h in range(3):
        assert _close64(hs.collapse(tree, h)(x), outs[h])
    tree.train()
    sum(o.sum() for o in tree(x)).backward()  # each child mutates its own copy
    tree.owns_input[1] = False  # the failure this guards against: in-place op on a shared view
    with pytest.raises(RuntimeError, match="inplace|in-place"):
        sum(o.sum() for o in tree(x)).backward()


def test_several_tensors_cross_the_cut_hrnet():
    model = timm.create_model("hrnet_w18_small", num_classes=5)
    size = (3, 64, 64)
    tree = hs.split(model, at=["stage3", "stage4"], heads=4, branch_init="copy", input_size=size).eval()
    crossing = [n for n in tree.levels[1][0].graph.nodes if n.op == "placeholder"]
    assert len(crossing) > 1
    x = _x(2, size).double()
    model.double(), tree.double()
    with torch.no_grad():
        ref = model.eval()(x)
        assert all(_close64(o, ref) for o in tree(x))


def test_train_eval_graphs_dropout_in_head():
    """ghostnet applies functional dropout in its head: traced per mode, eval is deterministic."""
    model = timm.create_model("ghostnet_100", num_classes=5, drop_rate=0.5)
    tree = hs.split(model, at=["blocks.7"], heads=2, branch_init="copy", input_size=SIZE)
    x = _x()
    tree.eval(), model.eval()
    with torch.no_grad():
        ref = model(x)
        assert all(max_abs_diff(o, ref) == 0 for o in tree(x))
    tree.train(), model.train()
    with torch.no_grad():
        a, b = tree(x)
    assert max_abs_diff(a, b) > 0  # dropout on in train mode, different masks per head


def test_drop_path_is_a_module_and_modes_match():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5, drop_path_rate=0.3)
    tree = hs.split(model, at=["blocks.10"], heads=2, branch_init="copy", input_size=SIZE)
    x = _x().double()
    tree.double().eval(), model.double().eval()
    with torch.no_grad():
        assert all(_close64(o, model(x)) for o in tree(x))
    tree.train()
    with torch.no_grad():
        a, b = tree(x)
    assert max_abs_diff(a, b) > 0


def test_shared_stateful_module_across_cut_coat():
    """CoaT's parallel blocks reuse the serial stages' conv position encodings."""
    model = timm.create_model("coat_tiny", num_classes=5, img_size=64)
    tree = hs.split(model, at=["parallel_blocks.0"], heads=2, seed=0, branch_init="independent",
                    input_size=(3, 64, 64))
    trunk_ids = {id(p) for p in tree.levels[0][0].parameters()}
    b0 = {id(p) for p in tree.levels[1][0].parameters()}
    b1 = {id(p) for p in tree.levels[1][1].parameters()}
    shared = trunk_ids & b0
    assert shared and shared <= b1  # one tensor for trunk and every branch
    for h in range(2):
        hs.collapse(tree, h)


def test_trace_constants_stay_out_of_weights_swin():
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, window_size=7, num_classes=5)
    tree = hs.split(model, at=["layers.2", "layers.3"], heads=4, seed=0, input_size=(3, 56, 56))
    keys = set(model.state_dict())
    for h in range(4):
        assert set(tree.head_state_dict(h)) == keys
        hs.collapse(tree, h)


# ----------------------------------------------------------------------------- persistence

def test_save_load_round_trip(tmp_path):
    tree = hs.split("resnet18", at=["layer3", "layer4"], heads=4, num_classes=7, input_size=SIZE)
    tree.train()
    sum(o.sum() for o in tree(_x())).backward()  # update BN stats so they must be saved
    tree.save(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["spec.json", "tree.safetensors", "tree.safetensors.sha256"]
    back = hs.HeadTree.load(tmp_path / "t")
    for (n1, a), (n2, b) in zip(tree.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)
    tree.eval(), back.eval()
    with torch.no_grad():
        assert all(max_abs_diff(a, b) == 0 for a, b in zip(tree(_x()), back(_x())))
    with pytest.raises(hs.HeadsurgeonError, match="not empty"):
        tree.save(tmp_path / "t")


def test_load_rejects_unreadable_dir(tmp_path):
    with pytest.raises(hs.HeadsurgeonError, match="not a head tree directory"):
        hs.HeadTree.load(tmp_path)
    (tmp_path / "spec.json").write_text("{broken")
    (tmp_path / "tree.safetensors").write_bytes(b"")
    with pytest.raises(hs.HeadsurgeonError, match="unreadable"):
        hs.HeadTree.load(tmp_path)


def test_export_loads_in_fresh_process_without_headsurgeon(tmp_path):
    tree = hs.split("resnet18", at=["layer3", "layer4"], heads=4, num_classes=7, input_size=SIZE).eval()
    model = hs.collapse(tree, 2)
    hs.export(model, tmp_path / "out", label_names=[f"c{i}" for i in range(7)])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architecture"] == "resnet18" and cfg["num_classes"] == 7 and cfg["label_names"][0] == "c0"
    x = _x()
    with torch.no_grad():
        want = model(x)  # the collapsed model; collapse checked it against the tree's head
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch, timm\n"
        f"m = timm.create_model('local-dir:{tmp_path / 'out'}', pretrained=True).eval()\n"
        f"y = m(torch.load('{tmp_path / 'x.pt'}'))\n"
        "assert 'headsurgeon' not in sys.modules\n"
        f"torch.save(y, '{tmp_path / 'y.pt'}')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    # exact: the same model, weights and input in a child with this process's environment (threads, ISA)
    assert max_abs_diff(torch.load(tmp_path / "y.pt"), want) == 0


# ----------------------------------------------------------------------------- bad input

def test_unknown_split_point_lists_valid_nearest_first():
    with pytest.raises(hs.HeadsurgeonError) as e:
        hs.split(_resnet(), at=["layer5"], heads=2, input_size=SIZE)
    msg = str(e.value)
    assert "\n" not in msg and "unknown split point 'layer5'" in msg
    listed = msg.split("nearest first): ")[1]
    assert listed.split(", ")[0].startswith("layer")


def test_split_points_out_of_order_or_nested():
    with pytest.raises(hs.HeadsurgeonError, match="forward order.*runs before"):
        hs.split(_resnet(), at=["layer4", "layer3"], heads=4, input_size=SIZE)
    with pytest.raises(hs.HeadsurgeonError, match="inside"):
        hs.split(_resnet(), at=["layer3.1", "layer3"], heads=4, input_size=SIZE)


def test_unknown_model_and_bad_heads():
    with pytest.raises(hs.HeadsurgeonError, match="unknown timm model 'resnet5O'.*resnet50"):
        hs.split("resnet5O", at=["layer3"], heads=2)
    with pytest.raises(hs.HeadsurgeonError, match="split point"):
        hs.split(_resnet(), at=[], heads=2, input_size=SIZE)
    with pytest.raises(hs.HeadsurgeonError, match="branch_init"):
        hs.split(_resnet(), at=["layer4"], heads=2, branch_init="random", input_size=SIZE)


def test_untraceable_model_names_the_module():
    model = _resnet()
    block = model.layer2[0]
    orig = block.forward
    block.forward = lambda x: orig(x) if x.sum() > 0 else orig(-x)  # data-dependent control flow
    with pytest.raises(hs.HeadsurgeonError, match="cannot trace .* in module 'layer2.0'"):
        hs.split(model, at=["layer3"], heads=2, input_size=SIZE)


def test_split_points_report_costs():
    from headsurgeon.points import split_points

    pts, params, flops = split_points(_resnet(), SIZE)
    names = [p.name for p in pts]
    assert names[:6] == ["input", "act1", "layer1", "layer2", "layer3", "layer4"]
    by = {p.name: p for p in pts}
    tree = hs.split(_resnet(), at=["layer3"], heads=2, branch_init="copy", input_size=SIZE)
    own = sum(p.numel() for p in tree.levels[1][0].parameters())
    assert by["layer3"].branch_params == own
    assert by["input"].branch_params == params and 0 < by["layer3"].branch_flops < flops


def test_torch_compile_whole_tree_train_and_eval():
    """The fork ops live inside one dynamo graph: no graph breaks, same outputs and gradients."""
    import torch._dynamo

    tree = hs.split("resnet10t", at=["layer3", "layer4"], heads=4, num_classes=5, seed=0, input_size=SIZE).double()
    x, y = _x().double(), torch.randint(0, 5, (4,))
    torch._dynamo.reset()
    assert torch._dynamo.explain(tree)(x).graph_break_count == 0
    ref = tree(x)
    sum(F.cross_entropy(z, y) for z in ref).backward()
    want = [p.grad.clone() for p in tree.parameters()]
    tree.zero_grad()
    compiled = torch.compile(tree, backend="aot_eager")
    outs = compiled(x)
    sum(F.cross_entropy(z, y) for z in outs).backward()
    assert all(_close64(b, a) for a, b in zip(ref, outs))
    assert all(_close64(p.grad, g) for p, g in zip(tree.parameters(), want))
    tree.eval()
    with torch.no_grad():
        assert all(_close64(a, b) for a, b in zip(compiled(x), tree(x)))


def test_load_skips_the_eager_check_unless_asked(tmp_path):
    """What split probed (which segments mutate their input) is stored, so load needs no forward pass."""
    tree = hs.split(_resnet(), at=["act1"], heads=2, seed=2, branch_init="independent", input_size=SIZE)
    tree.save(tmp_path / "t")
    assert hs.HeadTree.load(tmp_path / "t").owns_input == tree.owns_input == [False, True]
    assert hs.HeadTree.load(tmp_path / "t", verify=True).owns_input == [False, True]
    old = tmp_path / "old"  # written before owns_input was recorded: probed at load
    old.mkdir()
    spec = json.loads((tmp_path / "t" / "spec.json").read_text())
    del spec["owns_input"]
    (old / "spec.json").write_text(json.dumps(spec))
    (old / "tree.safetensors").write_bytes((tmp_path / "t" / "tree.safetensors").read_bytes())
    back = hs.HeadTree.load(old).eval()
    assert back.owns_input == [False, True] and back.spec.owns_input == (False, True)
    tree.eval()
    with torch.no_grad():
        assert max_abs_diff(back.collapse(1)(_x()), tree(_x())[1]) == 0


def test_spec_is_validated():
    spec = hs.split(_resnet(), at=["layer4"], heads=2, branch_init="copy", input_size=SIZE, verify=False).spec
    with pytest.raises(hs.HeadsurgeonError, match=r"unreadable \(.*fanout"):
        hs.SplitSpec.from_json(spec.to_json().replace('"heads": 2', '"heads": 3'))
    with pytest.raises(hs.HeadsurgeonError, match="rescale"):
        hs.SplitSpec.from_json(spec.to_json().replace('"rescale": true', '"rescale": 1'))
    with pytest.raises(hs.HeadsurgeonError, match="newer headsurgeon"):
        hs.SplitSpec.from_json(spec.to_json().replace('"format": 1', '"format": 99'))
    with pytest.raises(pydantic.ValidationError, match="frozen"):  # not just any error
        spec.heads = 4
    assert spec.heads == 2


def test_encoder_without_classifier_is_one_line():
    """timm's encoder-only models ignore num_classes; splitting them into classifier heads is refused."""
    from headsurgeon.errors import HeadsurgeonError
    from headsurgeon.models import create

    with pytest.raises(HeadsurgeonError, match="'qwen3_vit_88m_enc' is an encoder without a classifier"):
        create("qwen3_vit_88m_enc", {"num_classes": 10, "device": "meta"})
    assert create("resnet10t", {"num_classes": 10, "device": "meta"}).num_classes == 10
