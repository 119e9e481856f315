"""Training engine on CPU: tiny ImageFolder data, a narrow resnet10t, a few steps per epoch."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from click.testing import CliRunner
from PIL import Image

from headsurgeon import HeadsurgeonError, split
from headsurgeon import data as D
from headsurgeon import recipe as R
from headsurgeon import train as T
from headsurgeon.cli import main



@pytest.fixture(autouse=True)
def _quiet_timm_files(_seed):
    """timm's ImageDataset leaves PNG file handles to the garbage collector (after conftest's filters)."""
    warnings.filterwarnings("ignore", category=ResourceWarning)

TINY = ["model=resnet10t", "model_kwargs={channels: [8, 16, 32, 64], stem_width: 8}", "split.at=[layer3, layer4]",
        "split.heads=4", "data.img_size=16", "data.batch_size=8", "data.val_fraction=0.25", "epochs=2",
        "sched.warmup_epochs=0", "optim.lr=0.05"]


def make_folder(root: Path) -> Path:
    """3 classes of 12x12 images (a bright quadrant per class, plus noise): train 16/class, validation 6/class."""
    rng = np.random.default_rng(0)
    for split_, n in (("train", 16), ("validation", 6)):
        for c in range(3):
            d = root / split_ / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 90, (12, 12, 3), dtype=np.uint8)
                a[(c // 2) * 6:(c // 2) * 6 + 6, (c % 2) * 6:(c % 2) * 6 + 6] += 160
                Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imgs"))


def _recipe(folder, *extra):
    flat, _ = R.load(None, [*TINY, "data.dataset=folder", f"data.root={folder}", *extra])
    return flat


def _weights(run: Path) -> dict:
    return safetensors.torch.load_file(str(run / "last" / "tree.safetensors"))


def test_train_writes_metrics_summary_checkpoints_and_curves(folder, tmp_path):
    out = tmp_path / "run"
    s = T.train(_recipe(folder, "data.label_noise=0.25"), output=str(out), log=lambda m: None)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    for row in lines:
        for part in ("val", "test"):
            assert len(row[part]["heads"]) == 4 and set(row[part]["ensemble"]) == {"top1", "top5"}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == s and s["finished"] and s["samples"] == {"train": 36, "val": 12, "test": 18}
    assert s["label_noise"] == {"fraction": 0.25, "flipped": 9, "seed": 0}
    best = s["heads"][s["best_head"]]
    assert best["val_top1"] == max(h["val_top1"] for h in s["heads"])
    assert set(best) == {"index", "val_top1", "val_top5", "test_top1", "test_top5"}
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "best" / "spec.json").is_file() and (out / "last" / "state.pt").is_file()
    state = torch.load(out / "last" / "state.pt", weights_only=True)  # no arbitrary unpickling
    assert state["epoch"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_label_noise_is_train_only_and_symmetric(folder):
    sp = D.splits(_recipe(folder, "data.label_noise=0.5", "data.noise_seed=3"))
    clean = D.splits(_recipe(folder))
    assert sp.train.indices == clean.train.indices and sp.val.indices == clean.val.indices
    changed = [i for i in range(len(sp.train)) if sp.train[i][1] != clean.train[i][1]]
    assert len(changed) == sp.noise["flipped"] == 18  # every chosen label moves to another class
    assert all(sp.val[i][1] == clean.val[i][1] for i in range(len(sp.val)))
    assert set(sp.val.indices).isdisjoint(sp.train.indices)


def test_resume_gives_the_same_weights_as_one_straight_run(folder, tmp_path):
    flat = _recipe(folder, "data.label_noise=0.2")
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    a = T.train(flat, output=str(straight), log=lambda m: None)
    b1 = T.train(flat, output=str(parts), stop_after=1, log=lambda m: None)
    assert not b1["finished"] and b1["epochs_done"] == 1
    b = T.train(flat, output=str(parts), resume=True, log=lambda m: None)
    wa, wb = _weights(straight), _weights(parts)  # exact: the same ops in one process, so the same kernels
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = torch.load(straight / "last" / "state.pt", weights_only=True)
    sb = torch.load(parts / "last" / "state.pt", weights_only=True)
    assert sa["history"][1]["val"] == sb["history"][1]["val"] and a["heads"] == b["heads"]
    assert len((parts / "metrics.jsonl").read_text().splitlines()) == 2
    # a finished run refuses to resume; a changed recipe is refused, naming the change
    with pytest.raises(HeadsurgeonError, match="already finished"):
        T.train(flat, output=str(parts), resume=True, log=lambda m: None)
    changed = flat.model_copy(update={"optim": flat.optim.model_copy(update={"lr": 0.5})})
    with pytest.raises(HeadsurgeonError, match=r"changed recipe: optim.lr: 0.05 -> 0.5"):
        T.train(changed, output=str(parts), resume=True, log=lambda m: None)


def test_collapse_run_dir_matches_reported_test_accuracy(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flat = _recipe(folder, "epochs=1")
    s = T.train(flat, name="tiny", log=lambda m: None)  # default output: runs/tiny-<time>
    assert Path(s["run"]).parent == Path("runs")
    r = CliRunner().invoke(main, ["collapse", "-o", "head"])  # no argument: the most recent run
    assert r.exit_code == 0, r.output
    assert f"using the most recent run: {s['run']}" in r.output and f"best head {s['best_head']}" in r.output
    model = timm.create_model(f"local-dir:{(tmp_path / 'head').resolve()}", pretrained=True).eval()
    sp = D.splits(flat)
    from timm.data import resolve_data_config

    loader = D.loader(sp.test, flat, resolve_data_config(model=model), False, torch.device("cpu"))
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            n += len(y)
    # exact: the collapsed model runs the head's ops (the same logits, the same argmax), and the run's
    # percentage is count * 100 / n in float64 too
    assert 100 * correct / n == s["heads"][s["best_head"]]["test_top1"]
    r = CliRunner().invoke(main, ["collapse", s["run"], "--head", "3", "-o", "h3"])
    assert r.exit_code == 0 and (tmp_path / "h3" / "model.safetensors").is_file(), r.output


class _Poisoned:
    """An objective whose call is replaced, its other attributes (name, feature_source, ...) kept."""

    def __init__(self, objective, call):
        self._objective, self._call = objective, call

    def __getattr__(self, name):
        return getattr(self._objective, name)

    def __call__(self, *a, **k):
        return self._call(*a, **k)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(folder, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = T.objective_for

    def poisoned(recipe):
        objective = real(recipe)

        def call(*a, **k):
            calls["n"] += 1
            out = objective(*a, **k)
            if calls["n"] == 6:  # 4 steps per epoch: epoch 2, step 2
                out.loss = out.loss * float("nan")
            return out

        return call

    monkeypatch.setattr(T, "objective_for", lambda recipe: _Poisoned(real(recipe), poisoned(recipe)))
    out = tmp_path / "run"
    with pytest.raises(HeadsurgeonError, match=r"loss is nan at epoch 2 step 2; stopped, keeping the last good checkpoint"):
        T.train(_recipe(folder), output=str(out), log=lambda m: None)
    assert torch.load(out / "last" / "state.pt", weights_only=True)["epoch"] == 1
    assert json.loads((out / "summary.json").read_text())["epochs_done"] == 1


def test_cuda_out_of_memory_says_so(folder, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(T, "train_epoch", oom)
    with pytest.raises(HeadsurgeonError, match=r"CUDA out of memory at batch size 8 per process; .*data.batch_size=4"):
        T.train(_recipe(folder), output=str(tmp_path / "r"), log=lambda m: None)


def test_cli_bad_input_is_one_line(folder, tmp_path):
    run = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {batchsize: 4}\n")
    r = run.invoke(main, ["train", str(bad)])
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: {bad}: unknown recipe key 'data.batchsize'; did you mean 'data.batch_size'?")
    r = run.invoke(main, ["train", "--set", "data.dataset=folder", "--set", f"data.root={tmp_path / 'nowhere'}",
                          "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "dataset root" in r.output and "does not exist" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    r = run.invoke(main, ["train", "--resume", "-o", str(tmp_path / "none")])
    assert r.exit_code == 1 and "no last/state.pt" in r.output


def test_ema_channels_last_and_tree_recipe(folder, tmp_path):
    tree = split("resnet10t", at="layer4", heads=2, num_classes=3, input_size=(3, 16, 16), seed=0,
                 channels=[8, 16, 32, 64], stem_width=8)
    tree.save(tmp_path / "tree")
    flat, _ = R.load(None, ["data.dataset=folder", f"data.root={folder}", f"tree={tmp_path / 'tree'}", "data.img_size=16",
                            "data.batch_size=8", "epochs=1", "ema=0.9", "channels_last=true", "amp=bf16"])
    s = T.train(flat, output=str(tmp_path / "run"), log=lambda m: None)
    assert s["weights"] == "ema" and len(s["heads"]) == 2
    assert (tmp_path / "run" / "last" / "ema.safetensors").is_file()
    bad, _ = R.load(None, ["data.dataset=digits", f"tree={tmp_path / 'tree'}"])
    with pytest.raises(HeadsurgeonError, match="has 3 classes but dataset 'digits' has 10"):
        T.train(bad, output=str(tmp_path / "run2"), log=lambda m: None)


def test_optimizer_no_weight_decay_groups_on_tree():
    from timm.optim import create_optimizer_v2

    tree = split("test_vit", at="blocks.1", heads=2, seed=0)
    opt = create_optimizer_v2(tree, opt="sgd", lr=0.1, weight_decay=0.05)
    names = {id(p): n for n, p in tree.named_parameters()}
    no_wd = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "levels.0.0.pos_embed" in no_wd and "levels.0.0.cls_token" in no_wd  # timm's no_weight_decay()
    assert "levels.1.1.blocks.1.norm1.weight" in no_wd and "levels.1.0.head.bias" in no_wd
    assert "levels.1.1.blocks.1.attn.qkv.weight" not in no_wd


def test_metrics_record_fit_of_training_labels_and_old_recipes_resume(folder, tmp_path):
    out = tmp_path / "run"
    flat = _recipe(folder, "data.label_noise=0.25", "epochs=2")
    T.train(flat, output=str(out), stop_after=1, log=lambda m: None)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert len(row["train_top1"]) == 4 and all(0 <= a <= 100 for a in row["train_top1"])
    # a run directory from before data.folds / data.fold / data.train_fraction existed still resumes
    stored = yaml_load(out / "recipe.yaml")
    for key in ("folds", "fold", "train_fraction"):
        del stored["data"][key]
    (out / "recipe.yaml").write_text(yaml_dump(stored))
    s = T.train(flat, output=str(out), resume=True, log=lambda m: None)
    assert s["finished"] and s["epochs_done"] == 2


def yaml_load(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())


def yaml_dump(obj):
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


def test_late_consensus_schedule_is_logged_and_resumes_exactly(folder, tmp_path):
    """beta 1 -> 0.1 over 3 epochs: the rows log 1, 0.55, 0.1; stopped after epoch 1 and resumed, the run
    ends on the weights of the straight run (the schedule follows the epoch, not the process)."""
    flat = _recipe(folder, "epochs=3", "loss.beta=1", "loss.beta_end=0.1")
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    s = T.train(flat, output=str(straight), log=lambda m: None)
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["beta"] for r in rows] == [1.0, pytest.approx(0.55, abs=1e-15), 0.1]
    assert s["objective"] == {"name": "cl", "beta": 1.0, "temperature": 2.0, "t2": False, "label_smoothing": 0.0,
                              "beta_end": 0.1, "beta_epochs": 3}
    T.train(flat, output=str(parts), stop_after=1, log=lambda m: None)
    T.train(flat, output=str(parts), resume=True, log=lambda m: None)
    wa, wb = _weights(straight), _weights(parts)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    T.train(_recipe(folder, "epochs=3", "loss.beta=1"), output=str(tmp_path / "constant"), log=lambda m: None)
    wc = _weights(tmp_path / "constant")  # beta 1 throughout: the same first epoch, then other weights
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
