"""The model card `headsurgeon collapse` writes: front matter for the Hub and timm, the run's story, the marker."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner

import headsurgeon as hs
from headsurgeon.card import REPO_PLACEHOLDER, build_card, for_repo, hub_dataset, read_front_matter
from headsurgeon.cli import main
from headsurgeon.recipe import flatten
from headsurgeon.hub import verify
from headsurgeon.storage import sha256_file

SUMMARY = {"run": "runs/x", "finished": True, "epochs_done": 6, "epochs": 6, "best_epoch": 5, "best_head": 1,
           "heads": [{"index": 0, "val_top1": 81.25, "test_top1": 80.0}, {"index": 1, "val_top1": 87.5, "test_top1": 84.1}],
           "ensemble": {"val_top1": 88.0, "test_top1": 85.3}, "weights": "model", "best_dir": "best",
           "num_classes": 3, "samples": {"train": 90, "val": 10, "test": 30}, "label_names": ["zero", "one", "two"]}
RECIPE = {"model": "test_resnet", "split": {"at": ["layer4"], "heads": 2, "rescale": True},
          "data": {"dataset": "torch/cifar10", "root": "/data", "img_size": 32, "label_noise": 0.3, "noise_seed": 7, "batch_size": 16},
          "loss": {"beta": 0.4, "temperature": 3.0, "t2": False},
          "optim": {"opt": "sgd", "lr": 0.05}, "sched": {"sched": "cosine"}, "epochs": 6, "seed": 11}


@pytest.fixture(scope="module")
def tree_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("card")
    tree = hs.split("test_resnet", at=["layer4"], heads=2, num_classes=3, input_size=[3, 32, 32], seed=2)
    tree.save(d / "tree")
    run = d / "run"
    tree.save(run / "best")
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    (run / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    return d


def _collapse(*args: str):
    r = CliRunner().invoke(main, ["collapse", *args])
    assert r.exit_code == 0, r.output
    return r


def test_collapse_of_a_tree_writes_a_card_without_accuracies(tree_dir):
    out = tree_dir / "from-tree"
    r = _collapse(str(tree_dir / "tree"), "--head", "1", "-o", str(out))
    assert "README.md" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    meta = read_front_matter(card)
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert meta["license"] == "apache-2.0" and {"timm", "image-classification"} <= set(meta["tags"])
    assert "datasets" not in meta  # nothing is known about the data
    block = meta["headsurgeon"]
    assert block["head"] == 1 and block["trained"] is False and block["architecture"] == "test_resnet"
    assert block["files"] == {n: sha256_file(out / n) for n in ("config.json", "model.safetensors")}
    assert "## Results" not in card and "no accuracy is known" in card
    assert f'timm.create_model("hf-hub:{REPO_PLACEHOLDER}", pretrained=True)' in card
    assert "split at `layer4`" in card and "fan-out 2" in card
    assert verify(out) is None
    # the card does not disturb timm: the folder still loads, with the exported weights
    m = timm.create_model(f"local-dir:{out}", pretrained=True)
    tree = hs.HeadTree.load(tree_dir / "tree")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), tree.eval()(x)[1])


def test_collapse_of_a_run_tells_how_it_was_made(tree_dir):
    out = tree_dir / "from-run"
    r = _collapse(str(tree_dir / "run"), "-o", str(out))
    assert "best head 1" in r.output
    card = (out / "README.md").read_text()
    meta = read_front_matter(card)
    assert meta["datasets"] == ["uoft-cs/cifar10"] and meta["headsurgeon"]["trained"] is True
    assert json.loads((out / "config.json").read_text())["label_names"] == ["zero", "one", "two"]
    for text in ("β = 0.4", "T = 3.0", "label noise 0.3 (seed 7)", "6 epochs", "seed 11", "`torch/cifar10`",
                 "| **head 1 (this model)** | 87.50% | 84.10% |", "| head 0 | 81.25% | 80.00% |", "88.00% | 85.30% |",
                 "best epoch (5 of 6)", "highest validation top-1", "test accuracy played no part",
                 "Classes:** 3 (`zero`, `one`, `two`)", "Input size:** 3x32x32", "torch ", "timm "):
        assert text in card, text
    shown = flatten(yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0]), "card")
    assert flatten(RECIPE, "r").items() <= shown.items()  # the full recipe, resolved: every key it gave
    assert verify(out) is None


def test_a_head_picked_by_hand_says_so(tree_dir):
    out = tree_dir / "head0"
    _collapse(str(tree_dir / "run"), "--head", "0", "-o", str(out))
    card = (out / "README.md").read_text()
    assert "| **head 0 (this model)** |" in card and "chosen by hand (`--head 0`)" in card and "best head by validation is 1" in card


def test_verify_notices_edits_to_what_matters_only(tree_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tree_dir / "from-tree", out)
    (out / "README.md").write_text((out / "README.md").read_text().replace("## Usage", "## Usage\n\nEdited prose."))
    assert verify(out) is None  # the prose is free to edit
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "num_classes": 4}))
    assert "config.json differs" in verify(out)
    (out / "README.md").write_text("# no front matter\n")
    assert "no 'headsurgeon' block" in verify(out)


def test_card_helpers():
    assert read_front_matter("---\na: 1\n---\nbody") == {"a": 1}
    assert read_front_matter("no front matter") is None and read_front_matter("---\n[: x\n---\n") is None
    assert for_repo(f"x hf-hub:{REPO_PLACEHOLDER} y", "me/m") == "x hf-hub:me/m y"
    assert hub_dataset("hfds/ns/data") == "ns/data" and hub_dataset("digits") is None and hub_dataset(None) is None
    spec = hs.SplitSpec(architecture="resnet18", model_args={"num_classes": 10}, at=["input"], heads=3, fanout=[3],
                        rescale=False, branch_init="independent", seed=0, input_size=[3, 64, 64])
    card = build_card(spec, 2)
    assert "off (ablation)" in card and "for 10 classes at input size 3x64x64" in card
    assert read_front_matter(card)["headsurgeon"]["files"] == {}


def test_eval_results_the_hub_renders(tmp_path):
    """model-index via huggingface_hub: ModelCard.load reads back this head's test top-1/top-5 and,
    named as not this model, the ensemble's and the single-model baseline's."""
    from huggingface_hub import ModelCard

    spec = hs.SplitSpec(architecture="resnet18", model_args={"num_classes": 3}, at=["layer4"], heads=2, fanout=[2],
                        pretrained_cfg={"hf_hub_id": "timm/resnet18.a1_in1k", "license": "apache-2.0"})
    summary = {**SUMMARY, "heads": [{**h, "test_top5": 99.0 + h["index"] / 2} for h in SUMMARY["heads"]],
               "ensemble": {**SUMMARY["ensemble"], "test_top5": 99.9},
               "objective": {"name": "dml", "temperature": 1.0, "ramp": 0, "label_smoothing": 0.0}}
    single = {"heads": [{"index": 0, "val_top1": 80.0, "test_top1": 79.44, "test_top5": 98.0}]}
    recipe = {**RECIPE, "pretrained": True, "data": {**RECIPE["data"], "dataset": "digits"}}
    card = build_card(spec, 1, summary=summary, recipe=recipe, baseline=single)
    (tmp_path / "README.md").write_text(card)
    data = ModelCard.load(tmp_path / "README.md").data
    got = [(e.metric_name, e.metric_value, e.dataset_name, e.dataset_split, e.task_type, e.dataset_type)
           for e in data.eval_results]
    name = "scikit-learn digits, 30% symmetric label noise on train"
    assert got == [
        ("Top-1 accuracy (%)", 84.1, name, "test", "image-classification", "digits"),
        ("Top-5 accuracy (%)", 99.5, name, "test", "image-classification", "digits"),
        ("Top-1 accuracy (%), ensemble of all 2 heads (mean logits; not this model)", 85.3, name, "test",
         "image-classification", "digits"),
        ("Top-5 accuracy (%), ensemble of all 2 heads (mean logits; not this model)", 99.9, name, "test",
         "image-classification", "digits"),
        ("Top-1 accuracy (%), single model trained with the same budget (baseline; not this model)", 79.44, name,
         "test", "image-classification", "digits"),
        ("Top-5 accuracy (%), single model trained with the same budget (baseline; not this model)", 98.0, name,
         "test", "image-classification", "digits")]
    assert data.base_model == "timm/resnet18.a1_in1k" and data.library_name == "timm" and data.metrics == ["accuracy"]
    assert data.pipeline_tag == "image-classification" and data.license == "apache-2.0"
    assert data.to_dict()["headsurgeon"]["head"] == 1  # the proof block survives the round trip
    assert "**Objective:** `dml`, Deep Mutual Learning" in card and "temperature = 1.0" in card
    assert "| single model, same budget (baseline; not this model) | 80.00% | 79.44% | 98.00% |" in card
    assert "| **head 1 (this model)** | 87.50% | 84.10% | 99.50% |" in card
    assert "timm.data.resolve_data_config(model=model)" in card and "timm.data.create_transform(**config)" in card
    assert "30 images: one image is 3.33 pp" in card
    # without pretrained weights there is no base model; a tree without a run has no results
    plain = ModelCard(build_card(spec, 1, summary=summary, recipe=RECIPE)).data
    assert plain.base_model is None and plain.datasets == ["uoft-cs/cifar10"]
    assert plain.eval_results[0].dataset_type == "uoft-cs/cifar10" and plain.eval_results[0].dataset_split == "test"
    assert ModelCard(build_card(spec, 0)).data.eval_results is None


def test_a_run_is_labelled_by_its_best_record(tmp_path):
    """best/record.json (written with the best/ weights) wins over a summary.json an epoch behind."""
    from headsurgeon.card import read_run

    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    heads = [{"index": i, "val_top1": 50.0 + i, "test_top1": 40.0 + i, "val_top5": 90.0, "test_top5": 90.0}
             for i in range(2)]
    ens = {"val_top1": 55.0, "test_top1": 45.0, "val_top5": 95.0, "test_top5": 95.0}
    base = {"run": str(run), "finished": True, "epochs_done": 6, "epochs": 6, "best_epoch": 4, "best_head": 1,
            "heads": heads, "ensemble": ens, "best_dir": "best", "num_classes": 3}
    newer = {**base, "finished": False, "epochs_done": 5, "best_epoch": 5, "best_head": 0,
             "heads": [{**h, "test_top1": 70.0 + h["index"]} for h in heads]}
    (run / "summary.json").write_text(json.dumps(base))
    summary, _ = read_run(run)
    assert summary["best_epoch"] == 4
    (run / "best" / "record.json").write_text(json.dumps(newer))
    summary, _ = read_run(run)
    assert summary["best_epoch"] == 5 and summary["best_head"] == 0 and summary["heads"][0]["test_top1"] == 70.0
    assert summary["finished"] is True and summary["epochs_done"] == 6  # the run's progress: summary.json


def test_card_without_a_recorded_objective_names_the_beta_schedule():
    spec = hs.split("test_resnet", at=["layer4"], heads=2, num_classes=3, input_size=[3, 32, 32]).spec
    late = {**RECIPE, "loss": {**RECIPE["loss"], "beta": 1.0, "beta_end": 0.1}}
    card = build_card(spec, 1, summary=SUMMARY, recipe=late)
    assert "β = 1.0 (weight of the hard-label term), T = 3.0 (soft-target temperature), β moving to 0.1 by epoch 6 " \
           "(late consensus)." in card
    assert "late consensus" not in build_card(spec, 1, summary=SUMMARY, recipe=RECIPE)
