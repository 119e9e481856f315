import json
import os
from pathlib import Path

import pytest
import yaml

from headsurgeon import HeadsurgeonError
from headsurgeon import recipe as R

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_digits_recipe_is_the_embedded_default():
    flat, _ = R.load(RECIPES / "digits.yaml")
    assert flat == R.Recipe()


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    flat, _ = R.load(path)
    assert flat.epochs >= 1


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_the_nearest(tmp_path):
    with pytest.raises(HeadsurgeonError, match=r"unknown recipe key 'data.batchsize'; did you mean 'data.batch_size'"):
        R.load(_write(tmp_path, "data: {batchsize: 8}\n"))
    with pytest.raises(HeadsurgeonError, match=r"'epoch'; did you mean 'epochs'"):
        R.load(_write(tmp_path, "epoch: 3\n"))
    # synonyms no spelling distance finds (difflib alone said 'optim.clip_grad' here), and a right name in the
    # wrong section
    for key, hint in (("optim.learning_rate", "optim.lr"), ("optimizer", "optim.opt"), ("num_epochs", "epochs"),
                      ("data.lr", "optim.lr"), ("loss.heads", "split.heads")):
        with pytest.raises(HeadsurgeonError, match=rf"unknown recipe key '{key}'; did you mean '{hint}'\?$"):
            R.load(None, [f"{key}=1"])


@pytest.mark.parametrize("text,match", [
    ("epochs: two\n", r"'epochs' is 'two'; expected an integer >= 1"),
    ("epochs: 0\n", r"'epochs' is 0; expected an integer >= 1"),
    ("loss: {beta: 1.5}\n", r"'loss.beta' is 1.5; expected a number >= 0 and <= 1"),
    ("loss: {temperature: 0}\n", r"'loss.temperature' is 0; expected a number > 0"),
    ("loss: {objective: dml, beta_end: 0.1}\n", r"'loss.beta_end' schedules cl's beta; loss.objective 'dml' has no beta"),
    ("loss: {beta_epochs: 10}\n", r"'loss.beta_epochs' is set but 'loss.beta_end' is not"),
    ("loss: {beta_end: -0.1}\n", r"'loss.beta_end' is -0.1; expected a number >= 0 and <= 1"),
    ("epochs: 10\nloss: {beta_end: 0.1, beta_epochs: 11}\n", r"'loss.beta_epochs' is 11 but the run has 10 epochs"),
    ("data: {val_fraction: 0}\n", r"'data.val_fraction' is 0"),
    ("data: {label_noise: 1.0}\n", r"'data.label_noise' is 1.0; expected a number >= 0 and < 1"),
    ("amp: fp8\n", r"'amp' is 'fp8'; expected one of False, True, 'bf16', 'fp16'"),
    ("split: {heads: true}\n", r"'split.heads' is True; expected an integer"),
    ("data: 3\n", r"'data' must be a mapping"),
    ("sched: {sched: cosin}\n", r"'sched.sched' is 'cosin'; expected one of 'cosine'"),
    ("data: {scale: [0.5]}\n", r"'data.scale' is \[0.5\]; expected a list of 2 numbers"),
    ("- a\n- b\n", r"must be a YAML mapping"),
    ("data: {dataset: torch/cifar10}\n", r"needs 'data.root'"),
    ("pretrained: true\nweights: w.safetensors\n", r"use one of them"),
    ("split: {leaf_modules: [Gemma4VitEncoder]}\n", r"'split.leaf_modules' is \['Gemma4VitEncoder'\]; expected a list of module:Class strings"),
])
def test_bad_values_name_key_and_allowed(tmp_path, text, match):
    with pytest.raises(HeadsurgeonError, match=match):
        R.load(_write(tmp_path, text))


def test_set_overrides_and_types():
    flat, given = R.load(None, ["data.batch_size=8", "split.at=layer2,layer4", "ema=true", "amp=true", "output=null"])
    assert flat.data.batch_size == 8 and flat.split.at == ["layer2", "layer4"]
    assert flat.ema == 0.9998 and flat.amp == "bf16" and flat.output is None
    assert "data.batch_size" in given and "epochs" not in given
    with pytest.raises(HeadsurgeonError, match="--set expects key=value"):
        R.load(None, ["epochs"])


def test_tree_excludes_model_and_split(tmp_path):
    flat, _ = R.load(_write(tmp_path, "tree: some-tree\n"))
    assert flat.tree == "some-tree"
    with pytest.raises(HeadsurgeonError, match="'tree' already fixes the model and its split; remove split.heads"):
        R.load(_write(tmp_path, "tree: t\nsplit: {heads: 2}\n"))
    # a tree given on the command line replaces the file's model and split
    flat, _ = R.load(RECIPES / "cifar10-2-heads.yaml", ["tree=t"])
    assert flat.tree == "t" and flat.model_kwargs == R.Recipe().model_kwargs


def test_missing_and_malformed_recipe(tmp_path):
    with pytest.raises(HeadsurgeonError, match="does not exist"):
        R.load(tmp_path / "nope.yaml")
    with pytest.raises(HeadsurgeonError, match="not valid YAML"):
        R.load(_write(tmp_path, "a: [1, 2\n"))


def test_round_trip_and_diff():
    flat, _ = R.load(None, ["epochs=3"])
    again = R.from_flat(R.flatten(yaml.safe_load(yaml.safe_dump(flat.nested())), "x"))
    assert again == flat
    other, _ = R.load(None, ["epochs=4", "output=elsewhere"])
    assert R.diff(flat, other) == ["epochs: 3 -> 4"]


def test_every_error_of_a_recipe_in_one_line(tmp_path):
    with pytest.raises(HeadsurgeonError) as e:
        R.load(_write(tmp_path, "epochs: 0\ndata: {batchsize: 8, hflip: 2}\nloss: {beta: true}\n"))
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("'epochs' is 0", "unknown recipe key 'data.batchsize'; did you mean 'data.batch_size'",
                 "'data.hflip' is 2; expected a number >= 0 and <= 1", "'loss.beta' is True"):
        assert part in msg


def test_json_schema_is_committed_and_named_by_every_recipe():
    committed = (RECIPES / "recipe.schema.json").read_text()
    assert committed == R.schema_text(), "regenerate with: headsurgeon recipe --schema -o recipes/recipe.schema.json"
    schema = json.loads(committed)
    assert schema["properties"]["epochs"]["minimum"] == 1 and schema["additionalProperties"] is False
    for path in sorted(RECIPES.glob("*.yaml")):
        assert path.read_text().startswith("# yaml-language-server: $schema=recipe.schema.json\n"), path.name


def test_key_docs_cover_every_key():
    docs = {d["key"]: d for d in R.key_docs()}
    assert set(docs) == set(R.Recipe().flat())
    assert docs["data.label_noise"]["allowed"] == "a number >= 0 and < 1"
    assert docs["amp"]["allowed"] == "one of False, True, 'bf16', 'fp16'"
    assert docs["split.fanout"]["allowed"] == "a list of integers or null" and docs["epochs"]["default"] == 20


def test_paper_variants_map_to_trees():
    want = {"cifar10-single": ([], 1, 0.0), "cifar10-label-smoothing": ([], 1, 0.05),
            "cifar10-2-instances": (["input"], 2, 0.0), "cifar10-4-instances": (["input"], 4, 0.0),
            "cifar10-2-heads": (["layer3"], 2, 0.0), "cifar10-4-heads-hierarchical": (["layer3", "layer4"], 4, 0.0)}
    for name, (at, heads, ls) in want.items():
        flat, _ = R.load(RECIPES / f"{name}.yaml")
        assert (flat.split.at, flat.split.heads, flat.loss.label_smoothing) == (at, heads, ls), name
        assert flat.model == "resnet18" and flat.model_kwargs == {} and flat.data.dataset == "torch/cifar10"
    flat, _ = R.load(RECIPES / "imagenet-resnet50-4heads.yaml")
    assert (flat.model, flat.split.at, flat.split.heads) == ("resnet50", ["layer3", "layer4"], 4)


def test_peers_recipe_builds_a_resnet_and_a_mobilenet_on_grey_images():
    """The heterogeneous-peer recipe is the one a DML user starts from: two architectures, one per head,
    both taking the dataset's 1-channel images, trained with dml."""
    import torch

    from headsurgeon.train import check

    flat, _ = R.load(RECIPES / "fashion-mnist-peers.yaml")
    assert flat.loss.objective == "dml" and flat.data.dataset == "fashion-mnist"
    tree = check(flat)
    assert [tree.spec.peer(h).architecture for h in range(2)] == ["resnet10t", "mobilenetv3_small_050"]
    assert tree(torch.zeros(2, 1, 28, 28))[1].shape == (2, 10)


def test_digits_folds_are_disjoint_covering_stratified_and_fixed():
    from collections import Counter

    from sklearn.datasets import load_digits

    from headsurgeon import data as D

    targets = load_digits().target.tolist()
    folds = D.digits_folds(targets, 5)
    assert folds == D.digits_folds(targets, 5)  # fixed: no recipe seed involved
    assert sorted(Counter(folds).values()) == [359, 359, 359, 360, 360]
    for k in range(5):  # every class in every fold, in proportion (within one image)
        per = Counter(t for t, f in zip(targets, folds) if f == k)
        assert all(abs(per[c] - targets.count(c) / 5) < 1 for c in range(10))
    seen = []
    for k in range(5):
        test, train = D.Digits("validation", 5, k), D.Digits("train", 5, k)
        assert set(test.indices).isdisjoint(train.indices) and len(test) + len(train) == len(targets)
        assert test.targets == [targets[i] for i in test.indices]
        seen += test.indices
    assert sorted(seen) == list(range(len(targets)))  # every image is a test image exactly once


def test_folds_recipe_keys_and_train_fraction():
    sp = _splits(["data.folds=5", "data.fold=3"])
    assert sp.sizes() == {"train": 1294, "val": 144, "test": 359}
    assert set(sp.train.indices).isdisjoint(sp.val.indices)
    sub = _splits(["data.folds=5", "data.fold=3", "data.train_fraction=0.25", "data.label_noise=0.4"])
    assert sub.val.indices == sp.val.indices and set(sub.train.indices) < set(sp.train.indices)
    assert len(sub.train) == 324 and sub.noise["flipped"] == round(0.4 * 324)
    assert _splits([]).sizes() == {"train": 1293, "val": 144, "test": 360}  # unchanged without the new keys
    for sets, match in ((["data.fold=1"], "'data.folds' is not set"), (["data.folds=5", "data.fold=5"], "0..4"),
                        (["data.folds=1"], "'data.folds' is 1"), (["data.train_fraction=0"], "'data.train_fraction' is 0"),
                        (["data.folds=5", "data.dataset=folder", "data.root=x"], "digits dataset only")):
        with pytest.raises(HeadsurgeonError, match=match):
            R.load(None, sets)


def _splits(sets):
    from headsurgeon import data as D

    return D.splits(R.load(None, sets)[0])


def test_cli_recipe_prints_the_resolved_recipe_and_the_schema(tmp_path):
    from click.testing import CliRunner

    from headsurgeon.cli import main

    r = CliRunner().invoke(main, ["recipe", str(RECIPES / "fashion-mnist.yaml"), "--set", "epochs=3"])
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.output)
    assert shown["epochs"] == 3 and shown["data"]["dataset"] == "fashion-mnist" and shown["loss"]["objective"] == "cl"
    r = CliRunner().invoke(main, ["recipe", "--schema", "-o", str(tmp_path / "s.json")])
    assert r.exit_code == 0 and (tmp_path / "s.json").read_text() == R.schema_text()
    r = CliRunner().invoke(main, ["recipe", "--set", "epochs=0", "--set", "data.hflip=2"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "'epochs' is 0" in r.output and "'data.hflip' is 2" in r.output


def test_cli_recipe_check_builds_the_tree_without_data():
    """--check refuses what only the model can tell (a split point it lacks), in one line; a good recipe
    still prints the resolved YAML on stdout, with one 'checked:' line on stderr."""
    from click.testing import CliRunner

    from headsurgeon.cli import main

    tiny = ["--set", "model_kwargs={channels: [8, 16, 32, 64], stem_width: 8}", "--set", "data.img_size=16"]
    r = CliRunner().invoke(main, ["recipe", *tiny, "--set", "split.at=[layer3, layer5]", "--check"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "unknown split point 'layer5'" in r.output
    r = CliRunner().invoke(main, ["recipe", *tiny, "--set", "model=resnet10", "--check"])
    assert r.exit_code == 1 and "unknown timm model 'resnet10'; did you mean" in r.output
    r = CliRunner().invoke(main, ["recipe", *tiny, "--check"])
    assert r.exit_code == 0, r.output
    assert r.stderr == "checked: resnet10t split at layer3,layer4 into 4 heads, cut verified against the eager model\n"
    assert yaml.safe_load(r.stdout)["split"]["at"] == ["layer3", "layer4"]
    r = CliRunner().invoke(main, ["recipe", "--schema", "--check"])
    assert r.exit_code == 1 and "leave out RECIPE, --set and --check" in r.output


def test_cli_recipe_output_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    import errno

    from click.testing import CliRunner

    from headsurgeon.cli import main

    (tmp_path / "f").write_text("x")
    r = CliRunner().invoke(main, ["recipe", "-o", str(tmp_path / "f" / "r.yaml")])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "is a file, not a directory; choose another -o" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["recipe", "-o", str(tmp_path / "new" / "r.yaml")])  # missing folders are made
    assert r.exit_code == 0 and R.load(tmp_path / "new" / "r.yaml")[0] == R.Recipe()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    r = CliRunner().invoke(main, ["recipe", "--schema", "-o", str(tmp_path / "new" / "r.yaml")])
    monkeypatch.undo()
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit) and "no space left on the device" in r.output
    assert R.load(tmp_path / "new" / "r.yaml")[0] == R.Recipe() and sorted(os.listdir(tmp_path / "new")) == ["r.yaml"]


DOCS = RECIPES.parent / "docs"


@pytest.mark.parametrize("page", ["quickstart.md", "concepts.md", "training.md", "objectives.md"])
def test_recipe_examples_in_the_docs_validate(page):
    """Every ```yaml block of these pages is a recipe (or part of one) that validates as written."""
    import re

    blocks = re.findall(r"```yaml\n(.*?)```", (DOCS / page).read_text(), re.S)
    assert blocks, page
    for block in blocks:
        R.from_flat(R.flatten(R._yaml(block), page), page)


def test_docs_name_every_resume_free_key():
    text = (DOCS / "recipes.md").read_text()
    line = text[text.index("Keys that may change when a run is resumed"):]
    missing = [k for k in R.RESUME_FREE if f"`{k}`" not in line]
    assert not missing, f"docs/recipes.md does not list resume-free keys {missing}"


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_recipe_file_is_refused(tmp_path, text):
    with pytest.raises(HeadsurgeonError, match=r"recipe '.*r.yaml' is empty: give it keys"):
        R.load(_write(tmp_path, text))


def test_recipe_leaf_modules_reach_the_tracer():
    """split.leaf_modules is what lets a recipe train a model torch.fx cannot trace whole (gemma4_vit)."""
    from headsurgeon.train import tree_for

    sets = ["model=gemma4_vit_167m", "split.at=[input]", "split.heads=2", "data.img_size=32",
            "model_kwargs={embed_dim: 32, depth: 1, num_heads: 2, head_dim: 16, intermediate_size: 64}"]
    with pytest.raises(HeadsurgeonError, match="split.leaf_modules"):
        tree_for(R.load(None, sets)[0], classes=10)
    flat, _ = R.load(None, [*sets, "split.leaf_modules=[timm.models.gemma4_vit:Gemma4VitEncoder]"])
    tree = tree_for(flat, classes=10)
    assert tree.num_heads == 2 and tree.spec.leaf_modules == ("timm.models.gemma4_vit:Gemma4VitEncoder",)


@pytest.mark.parametrize("row", ["single", "hier4", "hier4-norescale", "ind4", "one4", "dml2", "kdcl2", "pcl4"])
@pytest.mark.parametrize("noise", [0.0, 0.4])
def test_long_study_recipe_is_the_studys_setting(row, noise):
    """recipes/fashion-mnist-long.yaml is what benchmarks/paper.py trains: a drift between them would make
    the shipped recipe claim numbers it did not produce."""
    import sys
    sys.path.insert(0, str(RECIPES.parent / "benchmarks"))
    import paper

    sets = [*paper.ROWS[row], f"data.label_noise={noise}", "seed=3"]
    shipped, _ = R.load(RECIPES / "fashion-mnist-long.yaml", sets)
    study, _ = R.load(None, paper.overrides(row, noise, 0, 3, paper.FML_SETTINGS))
    assert shipped.model_dump() == study.model_dump()


def test_late_consensus_schedule_ends_at_the_runs_last_epoch_unless_told():
    from headsurgeon.train import objective_for

    r, _ = R.load(None, ["loss.beta=1", "loss.beta_end=0.1", "epochs=7"])
    cl = objective_for(r)
    assert (cl.beta, cl.beta_end, cl.beta_epochs) == (1.0, 0.1, 7)
    cl.set_epoch(6)
    assert cl.beta_now == 0.1
    r, _ = R.load(None, ["loss.beta_end=0.1", "loss.beta_epochs=3", "epochs=7"])
    assert objective_for(r).beta_epochs == 3
    assert "beta_end" not in objective_for(R.load(None, [])[0]).describe()  # no schedule, none recorded
