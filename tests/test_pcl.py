"""PCL inside the training loop: the peer ensemble and the temporal mean (EMA tree) are wired, trained,
checkpointed, resumed exactly, evaluated and exported (objectives.md §6)."""
import copy
import json
import shutil

import pytest
import safetensors.torch
import timm
import torch

from headsurgeon import HeadsurgeonError
from headsurgeon import objectives as O
from headsurgeon import recipe as R
from headsurgeon import train as T
from headsurgeon.models import model_from_peer
from headsurgeon.modes import eval_mode
from headsurgeon.pipeline import collapse_dir
from headsurgeon.tree import HeadTree
from headsurgeon.verify import tolerance

from test_train import _recipe, folder  # noqa: F401  (the tiny image-folder fixture)
from test_train_parity import _kill_mid_epoch

PCL = "loss.objective=pcl"


def _quiet(m):
    return None


def _load(run, name, where="last"):
    return safetensors.torch.load_file(str(run / where / name))


def _ema_tree(run):
    """The temporal mean of a run's last epoch: last/'s tree with last/ema.safetensors loaded into it."""
    tree = HeadTree.load(run / "last")
    safetensors.torch.load_model(tree, str(run / "last" / "ema.safetensors"))
    return tree.eval()


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory):  # noqa: F811
    """A 2-epoch pcl run, the same stopped after epoch 1 ("one"), and that copy resumed to the end."""
    root = tmp_path_factory.mktemp("pcl")
    flat = _recipe(folder, PCL)
    said: list[str] = []
    T.train(flat, output=str(root / "straight"), log=said.append)
    (root / "straight.log").write_text("\n".join(said))
    T.train(flat, output=str(root / "one"), stop_after=1, log=_quiet)
    shutil.copytree(root / "one", root / "resumed")
    T.train(flat, output=str(root / "resumed"), resume=True, log=_quiet)
    return root


def test_pcl_trains_learns_and_keeps_its_state(runs):
    out = runs / "straight"
    s = json.loads((out / "summary.json").read_text())
    assert s["objective"] == {"name": "pcl", "temperature": 3.0, "ramp": 0, "ema_decay": 0.999, "label_smoothing": 0.0}
    assert s["weights"] == "ema"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_terms"]["teacher_ce"] > 0 and len(r["loss_terms"]["soft"]) == 4 for r in rows)
    # it learns: the heads' CE and the peer ensemble's fall (the total need not: the distillation towards a
    # temporal mean that lags the heads grows while they move fast), and the temporal mean beats chance
    hard = [sum(r["loss_terms"]["hard"]) for r in rows]
    assert hard[0] > hard[1] + 1 and rows[0]["loss_terms"]["teacher_ce"] > rows[1]["loss_terms"]["teacher_ce"]
    best = s["heads"][s["best_head"]]
    assert best["val_top1"] > 100 / 3 and best["test_top1"] > 100 / 3 + 30  # 3 classes; 12 val, 18 test images
    ens = _load(out, "objective.safetensors")                     # the peer ensemble: [C, 4 heads x 64 features]
    assert ens["fc.weight"].shape == (3, 4 * 64) and set(ens) == {"fc.weight", "fc.bias"}
    live, mean = _load(out, "tree.safetensors"), _load(out, "ema.safetensors")
    assert live.keys() == mean.keys() and any(not torch.equal(live[k], mean[k]) for k in live)


def test_best_is_the_temporal_mean_and_collapse_exports_it(runs, tmp_path):
    out = runs / "one"  # one epoch: best/ must be the final temporal mean
    s = json.loads((out / "summary.json").read_text())
    best, mean = _load(out, "tree.safetensors", "best"), _load(out, "ema.safetensors")
    live = _load(out, "tree.safetensors")
    assert all(torch.equal(best[k], mean[k]) for k in best)
    assert any(not torch.equal(best[k], live[k]) for k in best)    # not the live weights
    head = s["best_head"]
    exported, _ = collapse_dir(out, None, tmp_path / "export", log=_quiet)
    # float64 on both sides (the float32 weights convert exactly): 84 ulps of the largest logit, verify.tolerance
    model = timm.create_model(f"local-dir:{exported}", pretrained=True).double().eval()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ema_tree, live_tree = _ema_tree(out).double(), HeadTree.load(out / "last").double().eval()
    with torch.no_grad():
        got, want, other = model(x), ema_tree(x)[head], live_tree(x)[head]
    assert torch.allclose(got, want, atol=tolerance(want, in_dtype=True), rtol=0)
    assert not torch.allclose(got, other, atol=1e-3)               # the test can tell the two apart


def test_pcl_resumes_bit_identically(runs):
    straight, resumed = runs / "straight", runs / "resumed"
    assert {"ema.safetensors", "objective.safetensors"} <= {p.name for p in (runs / "one" / "last").iterdir()}
    for name in ("tree.safetensors", "ema.safetensors", "objective.safetensors"):  # same process, same ops: exact
        a, b = _load(straight, name), _load(resumed, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    drop = lambda m: {k: v for k, v in m.items() if k != "time_s"}  # noqa: E731
    rows = [[drop(json.loads(x)) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, resumed)]
    assert rows[0] == rows[1]


def test_pcl_killed_mid_epoch_resumes_bit_identically(folder, tmp_path):  # noqa: F811
    sets = [PCL, "recovery_interval=1", "epochs=1", "data.batch_size=4"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed subprocess: the same float reduction order
    try:
        straight, killed = tmp_path / "straight", tmp_path / "killed"
        T.train(_recipe(folder, *sets), output=str(straight), log=_quiet)
        _kill_mid_epoch(folder, sets, killed, 0)  # within the first epoch: no last/ yet
        T.train(_recipe(folder, *sets), output=str(killed), resume=True, log=_quiet)
    finally:
        torch.set_num_threads(threads)
    for name in ("tree.safetensors", "ema.safetensors", "objective.safetensors"):
        a, b = _load(straight, name), _load(killed, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


class Spy:
    """The run's objective, recording the target and the loss of the first step it computes."""

    def __init__(self, objective, seen):
        self.objective, self.seen = objective, seen

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, logits, target, **kw):
        out = self.objective(logits, target, **kw)
        self.seen.setdefault("y", target.clone())
        self.seen.setdefault("loss", out.loss.detach().clone())
        return out


def _timm_head(tree_state, spec, head, tree):
    """Head ``head`` of a tree state as a plain timm model (train mode, like the step): an independent
    reference for its pre-logits features (``forward_head(pre_logits=True)``) and logits."""
    scratch = copy.deepcopy(tree)
    scratch.load_state_dict(tree_state)
    m = model_from_peer(spec.peer(0))
    m.load_state_dict(scratch.head_state_dict(head), strict=True)
    return m.train()


def test_one_step_loss_is_pcl_of_the_trees_features_logits_and_temporal_mean(folder, tmp_path):  # noqa: F811
    run = T.build(_recipe(folder, PCL, "epochs=2"), output=str(tmp_path / "run"), log=_quiet)
    try:
        T.train_epoch(run, 0)  # epoch 0: the temporal mean moves away from the live weights
        live, mean = copy.deepcopy(run.tree.state_dict()), copy.deepcopy(run.ema.module.state_dict())
        ens = copy.deepcopy(run.modules)  # no DDP here
        assert any(not torch.equal(live[k], mean[k]) for k in live if k.endswith("weight"))
        seen = {}
        run.tree.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
        run.task.objective = Spy(run.task.objective, seen)
        T.train_epoch(run, 1)
    finally:
        run.dir.unlock()
    x, y = seen["x"], seen["y"]
    spec, H = run.tree.spec, run.tree.num_heads
    feats, logits, means = [], [], []
    with torch.no_grad():
        for j in range(H):  # BatchNorm in train mode: batch statistics, as in the step
            m = _timm_head(live, spec, j, run.tree)
            f = m.forward_head(m.forward_features(x), pre_logits=True)
            feats.append(f)
            logits.append(m.get_classifier()(f))
            e = _timm_head(mean, spec, j, run.tree)
            means.append(e(x))
        want = O.get("pcl").from_teachers(logits, y, ens(feats), means).loss
        # the same numbers from the wrong inputs differ: the live tree's logits as the temporal mean
        wrong = O.get("pcl").from_teachers(logits, y, ens(feats), logits).loss
    # float32 (the step's precision) against the same ops in float32: at most a reordered sum, a few ulps
    # (a float64 reference is 1 ulp off); 1e-5 = 84 ulps, as verify.tolerance; the wrong inputs move it > 1e-3
    assert seen["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert abs(wrong.item() - want.item()) > 1e-3


def test_pcl_with_ema_is_refused_in_one_line():
    with pytest.raises(HeadsurgeonError, match="'ema' is set but loss.objective 'pcl' keeps its own temporal mean"):
        R.load(None, [PCL, "ema=true"])
    with pytest.raises(HeadsurgeonError, match="ema_decay"):
        R.load(None, [PCL, "loss.ema_decay=1.0"])


def test_temporal_mean_follows_the_reimplementations_warm_up():
    # a = min(1 - 1/(k + 1), decay) at the k-th optimizer step (0-based): the mean of all weights so far, then an EMA
    tree = torch.nn.Linear(1, 1, bias=False)
    for decay, want in ((0.999, [1.0, 1.5, 2.0, 2.5]), (0.6, [1.0, 1.5, 1.5 * 0.6 + 3 * 0.4, 2.1 * 0.6 + 4 * 0.4])):
        ema = T.temporal_mean(tree, O.get("pcl", ema_decay=decay))
        seen = []
        for k in range(4):
            with torch.no_grad():
                tree.weight.fill_(float(k + 1))
            ema.update(tree, step=k)
            seen.append(ema.module.weight.item())
        assert seen == pytest.approx(want, rel=1e-6)  # float32 EMA: <= 1 ulp per update, 4 updates: < 5e-7
    assert T.temporal_mean(tree, O.get("cl")) is None and T.temporal_mean(tree, O.get("cl"), 0.9).decay == 0.9


def test_head_features_are_each_classifiers_input(folder, tmp_path):  # noqa: F811
    run = T.build(_recipe(folder, PCL), output=str(tmp_path / "run"), log=_quiet)
    run.dir.unlock()
    x = torch.randn(2, 3, 16, 16)
    with eval_mode(run.tree), torch.no_grad():
        outs = run.tree(x)
        for j in range(run.tree.num_heads):
            assert run.task.features[j].shape == (2, 64)
            # exact: the classifier's own op on the very tensor the forward fed it
            assert torch.equal(run.tree.classifier(j)(run.task.features[j]), outs[j])
        run.ema.module(x)  # the temporal mean is a copy made before the hooks: it leaves nothing there
    assert isinstance(run.modules, O.PeerEnsemble) and run.modules.widths == [64] * 4
    with pytest.raises(HeadsurgeonError, match="head 4 does not exist"):
        run.tree.classifier(4)


def test_heterogeneous_peers_give_their_own_features(folder, tmp_path):  # noqa: F811
    """Peers of different models: each head's classifier is its own model's, so are the feature widths."""
    flat, _ = R.load(None, ["model=[resnet10t, mobilenetv3_small_050]", PCL, "data.dataset=folder",
                            f"data.root={folder}", "model_kwargs=[{channels: [8, 16, 32, 64], stem_width: 8}, {}]",
                            "data.img_size=16", "data.batch_size=8", "epochs=1", "sched.warmup_epochs=0"])
    run = T.build(flat, output=str(tmp_path / "run"), log=_quiet)
    run.dir.unlock()
    assert run.modules.widths == [64, 1024] and run.modules.fc.in_features == 64 + 1024
    x = torch.randn(2, 3, 16, 16)
    with eval_mode(run.tree), torch.no_grad():
        outs = run.tree(x)
        for j in range(2):
            assert torch.equal(run.tree.classifier(j)(run.task.features[j]), outs[j])
    loss, _, terms = T.train_epoch(run, 0)
    assert torch.isfinite(torch.tensor(loss)) and len(terms["soft"]) == 2 and terms["teacher_ce"] > 0


def test_a_temporal_mean_slower_than_the_run_is_named(runs):
    """An exported EMA whose window is a large share of the run's steps lags the weights (Fashion-MNIST:
    PCL at 0.999 over ~2,700 steps); the log says so and names a decay that fits the budget."""
    from types import SimpleNamespace

    from headsurgeon.train import _warn_slow_mean

    said: list[str] = []
    _warn_slow_mean(SimpleNamespace(decay=0.999), 2700, "loss.ema_decay", said.append)
    assert said == ["note: loss.ema_decay 0.999 averages the weights over about 1,000 optimizer steps, 37% of this "
                    "run's 2,700: the evaluated and exported mean will lag the trained weights; about 0.991 (a window "
                    "of 4 % of the steps) fits this budget"]
    _warn_slow_mean(SimpleNamespace(decay=0.99), 2700, "loss.ema_decay", said.append)  # 100 steps: 3.7 %
    _warn_slow_mean(None, 2700, "ema", said.append)
    assert len(said) == 1
    _warn_slow_mean(SimpleNamespace(decay=0.9), 20, "ema", said.append)
    assert said[-1].endswith("a much smaller decay, or more steps, fits this budget")
    assert "note: loss.ema_decay 0.999 averages the weights over about 1,000 optimizer steps" in \
        (runs / "straight.log").read_text()  # a real pcl run's log (2 tiny epochs)
