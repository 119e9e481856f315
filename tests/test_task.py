"""CollaborativeTask: the public API for an own training loop (plain PyTorch, Lightning, Accelerate,
timm's TrainingTask contract), checked against `headsurgeon train` and against timm reloads."""
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.task import TrainingTask

import headsurgeon as hs
from headsurgeon import data as D
from headsurgeon import objectives as O
from headsurgeon import recipe as R
from headsurgeon import train as T

from test_train import _recipe, folder  # noqa: F401  (the tiny image-folder fixture)

TINY = dict(model_kwargs=dict(channels=[8, 16, 32, 64], stem_width=8))
SIZE = (3, 16, 16)
PARAMS = {"cl": {}, "dml": {}, "one": {}, "kdcl": {}, "pcl": {"ema_decay": 0.9}}


def _tree(heads=3, at=("layer3",), seed=0):
    return hs.split("resnet10t", at=list(at), heads=heads, num_classes=5, seed=seed, input_size=SIZE,
                    **TINY["model_kwargs"])


def _batches(n=3, b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, *SIZE, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(n)]


def _plain_loop(task, batches, epochs=2, lr=0.05):
    """The README's own-loop example, verbatim in spirit: timm's optimizer factory over the task."""
    opt = create_optimizer_v2(task, "sgd", lr=lr, weight_decay=5e-4, momentum=0.9)
    for epoch in range(epochs):
        task.train()
        task.set_epoch(epoch)
        for x, y in batches:
            out = task(x, y)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            task.after_step()
    return opt


@pytest.mark.parametrize("name", list(PARAMS))
def test_plain_loop_trains_every_objective_and_collapses_to_a_timm_model(name, tmp_path):
    task = hs.CollaborativeTask(_tree(), name, **PARAMS[name])
    assert isinstance(task, TrainingTask) and isinstance(task, torch.nn.Module)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    _plain_loop(task, _batches())
    after = task.state_dict()
    assert set(before) == set(after)  # the task's state is everything: tree, gate/ensemble, temporal mean
    moved = [k for k in before if k.startswith("trainable_module.") and not torch.equal(before[k], after[k])]
    assert moved
    if name == "one":
        assert any(k.startswith("objective_modules.") and not torch.equal(before[k], after[k]) for k in before)
    if name == "pcl":  # the temporal mean is checkpointed and lags the live tree
        assert int(after["num_updates"]) == 6
        ema = [k for k in before if k.startswith("trainable_module_ema.")]
        assert ema and any(not torch.equal(before[k], after[k]) for k in ema)
    # every trainable parameter is in the optimizer, the temporal mean's are not
    opt = create_optimizer_v2(task, "sgd", lr=0.1)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in task.parameters() if p.requires_grad}
    assert task.ema is None or not any(id(p) in in_opt for p in task.ema.parameters())

    model = task.collapse(1)  # pcl: from the temporal mean, which is what pcl evaluates
    hs.export(model, tmp_path / "out")
    back = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = _batches(1, 4, seed=7)[0][0]
    with torch.no_grad():
        want = task.evaluated_tree.eval()(x)[1]
        assert torch.equal(back(x), model.eval()(x))
        # the collapsed head is the tree's head: the same float32 ops in another graph, so equal up to
        # reassociation (a few ulps of the logits' magnitude)
        torch.testing.assert_close(back(x), want, rtol=0, atol=64 * torch.finfo(torch.float32).eps * want.abs().max().item())


def test_results_read_as_timm_task_dicts_and_the_objectives_parts():
    task = hs.CollaborativeTask(_tree(), "one")
    x, y = _batches(1)[0]
    out = task(x, y)
    assert set(out.keys()) >= {"loss", "output", "hard", "soft", "teacher_ce"}
    assert out["loss"] is out.loss and len(out.logits) == 3
    torch.testing.assert_close(out["output"], torch.stack(out.logits).mean(0), rtol=0, atol=0)
    # the task's loss is the objective's loss of the same logits and the trunk's output at the fork
    feats = task.tree.levels[0][0](x)
    ref = task.objective(out.logits, y, features=feats if torch.is_tensor(feats) else feats[0],
                         modules=task.objective_modules)
    assert torch.equal(ref.loss, out.loss)


def test_timm_optimizer_factory_sees_no_weight_decay_and_layer_groups():
    task = hs.CollaborativeTask(_tree(), "pcl")
    nwd = task.no_weight_decay()
    assert nwd == {"trainable_module." + n for n in task.tree.no_weight_decay()}
    match = task.group_matcher()
    tree_ids = {n: task.tree.group_matcher()(n) for n, _ in task.tree.named_parameters()}
    for n, _ in task.named_parameters():
        if n.startswith("trainable_module."):
            assert match(n) == tree_ids[n[len("trainable_module."):]]
        else:  # the peer ensemble learns at the classifiers' rate
            assert match(n) == max(tree_ids.values())
    opt = create_optimizer_v2(task, "sgd", lr=0.1, weight_decay=1e-4, layer_decay=0.5)
    assert len(opt.param_groups) > 2


def test_task_state_round_trips_through_timm_checkpoint_helpers():
    a = hs.CollaborativeTask(_tree(), "pcl", ema_decay=0.9)
    _plain_loop(a, _batches(2), epochs=1)
    b = hs.CollaborativeTask(_tree(seed=5), "pcl", ema_decay=0.9)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    state = a.get_checkpoint_state()
    c = hs.CollaborativeTask(_tree(seed=6), "pcl", ema_decay=0.9)
    c.load_checkpoint_state(state["state_dict"], state.get("task_state"))
    assert int(c.num_updates) == int(a.num_updates) == 2
    for k, v in a.teacher.state_dict().items():  # pcl's eval model is the temporal mean
        assert torch.equal(v, c.teacher.state_dict()[k])


def test_bad_arguments_are_one_line():
    with pytest.raises(hs.HeadsurgeonError, match="unknown objective 'nope'"):
        hs.CollaborativeTask(_tree(), "nope")
    with pytest.raises(hs.HeadsurgeonError, match="keeps its own temporal mean"):
        hs.CollaborativeTask(_tree(), "pcl", ema=0.99)
    with pytest.raises(hs.HeadsurgeonError, match="takes a HeadTree"):
        hs.CollaborativeTask(torch.nn.Linear(2, 2), "cl")
    with pytest.raises(hs.HeadsurgeonError, match="already built"):
        hs.CollaborativeTask(_tree(), O.get("dml"), temperature=2.0)


# ---------------------------------------------------------------------------------- exactness vs train

@pytest.mark.parametrize("objective", ["cl", "one", "pcl"])
def test_plain_loop_reproduces_headsurgeon_train_bit_for_bit(objective, folder, tmp_path, monkeypatch):  # noqa: F811
    """The same seed and the same batches through the plain loop end at `headsurgeon train`'s weights:
    the trainer is the task's first consumer, not a second implementation."""
    sets = [f"loss.objective={objective}", "split.at=[layer4]", "split.heads=2", "epochs=1", "sched.sched=none",
            "data.no_aug=true"] + (["loss.ema_decay=0.9"] if objective == "pcl" else [])
    recipe = _recipe(folder, *sets)
    seen: list = []
    real = D.loader

    class Recording:
        def __init__(self, ld):
            self.ld, self.sampler = ld, getattr(ld, "sampler", None)

        def __len__(self):
            return len(self.ld)

        def __iter__(self):
            for x, y in self.ld:
                seen.append((x.clone(), y.clone()))
                yield x, y

    monkeypatch.setattr(D, "loader", lambda view, r, cfg, training, *a, **k:
                        Recording(real(view, r, cfg, training, *a, **k)) if training else real(view, r, cfg, training, *a, **k))
    T.train(recipe, output=str(tmp_path / "run"), log=lambda m: None)
    trained = safetensors.torch.load_file(str(tmp_path / "run" / "last" / "tree.safetensors"))
    assert seen

    from timm.utils import random_seed

    random_seed(recipe.seed)  # as `train` seeds before it builds the tree
    tree = hs.split("resnet10t", at=["layer4"], heads=2, num_classes=3, seed=recipe.seed, input_size=(3, 16, 16),
                    **TINY["model_kwargs"])
    task = hs.CollaborativeTask(tree, T.objective_for(recipe), input_size=(3, 16, 16))
    opt = create_optimizer_v2(task, "sgd", lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay,
                              momentum=recipe.optim.momentum)
    task.train()
    task.set_epoch(0)
    for x, y in seen:
        out = task(x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        task.after_step()
    mine = tree.state_dict()
    assert set(mine) == set(trained)
    assert all(torch.equal(mine[k], trained[k]) for k in mine), [k for k in mine if not torch.equal(mine[k], trained[k])][:3]


# ---------------------------------------------------------------------------------- a new objective

@O.register
@dataclass
class MeanTeacher(O.Objective):
    """A toy objective for the "Adding an objective" example: CE plus MSE to the heads' detached mean."""
    name: ClassVar[str] = "test-mean-mse"
    weight: float = 0.5
    label_smoothing: float = 0.0

    def __call__(self, logits, target, features=None, modules=None, mean_logits=None):
        mean = torch.stack([z.detach() for z in logits]).mean(0)
        hard = [F.cross_entropy(z, target, label_smoothing=self.label_smoothing) for z in logits]
        soft = [F.mse_loss(z, mean) for z in logits]
        loss = sum(h + self.weight * s for h, s in zip(hard, soft))
        return O.LossOut(loss, [h.detach() for h in hard], [s.detach() for s in soft])


def test_a_registered_objective_trains_in_a_task_and_in_a_recipe(folder, tmp_path):  # noqa: F811
    task = hs.CollaborativeTask(_tree(), "test-mean-mse", weight=0.25)
    assert task.objective.describe() == {"name": "test-mean-mse", "weight": 0.25, "label_smoothing": 0.0}
    _plain_loop(task, _batches(2), epochs=1)
    recipe = _recipe(folder, "loss.objective=test-mean-mse", "epochs=1")  # the recipe takes registered names
    assert T.objective_for(recipe).describe()["name"] == "test-mean-mse"
    s = T.train(recipe, output=str(tmp_path / "run"), log=lambda m: None)
    assert s["objective"]["name"] == "test-mean-mse"
    with pytest.raises(hs.HeadsurgeonError, match="not a registered objective"):
        R.load(None, ["loss.objective=test-mean-ms"])


# ---------------------------------------------------------------------------------- other loops

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


@pytest.mark.parametrize("example", ["plain_loop", "lightning_loop", "accelerate_loop"])
@pytest.mark.parametrize("objective", ["one", "pcl"])
def test_the_docs_examples_train_and_collapse_to_a_model_timm_reloads(example, objective, tmp_path, monkeypatch):
    """docs/examples/*.py, as docs/own-loop.md shows them: each trains 4 heads on digits in its loop and
    exports a head that timm reloads; it must also have learned (digits: well above 10 % chance)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module(example)
    model = module.main(str(tmp_path / "out"), objective, epochs=2).eval()
    assert type(model).__name__ == "ResNet"
    _, test = importlib.import_module("plain_loop").digits_loaders()
    with torch.no_grad():
        hits = sum((model(x).argmax(1) == y).sum().item() for x, y in test)
    assert hits / 300 > 0.5
