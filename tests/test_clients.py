"""The export loads unchanged in clients headsurgeon did not write: transformers (the Hub's loader for
timm models: TimmWrapper model, image processor, image-classification pipeline) and ONNX Runtime.

A tiny run is made for real: a 2-head tree learns red/green/blue images for a few steps, its test
accuracy goes into the run's summary, and ``headsurgeon collapse`` exports the best head. Every client
must then give the timm model's predictions on the test images, and so the accuracy the card reports.
Local paths only, with huggingface_hub offline.
"""
from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from PIL import Image

import headsurgeon as hs
from headsurgeon.cli import main
from headsurgeon.data import eval_config
from headsurgeon.hub import verify
from headsurgeon.recipe import flatten, from_flat

LABELS = ["red", "green", "blue"]
RECIPE = {"model": "test_resnet", "split": {"at": ["layer4"], "heads": 2},
          "data": {"dataset": "folder", "root": "colours", "img_size": 32, "batch_size": 12}, "epochs": 1, "seed": 0}
U = 2.0 ** -24  # float32 unit roundoff


@pytest.fixture(scope="module", autouse=True)
def offline():
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, which may be past
        yield


def colours(n: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """``n`` noisy 40x48 images (the processor resizes them to 32x32), channel ``label`` a little brighter: a weak
    signal, so that the model gets some wrong and the clients must make the same mistakes."""
    rng = np.random.default_rng(seed)
    labels = [i % 3 for i in range(n)]
    images = []
    for c in labels:
        a = rng.integers(0, 200, (40, 48, 3))
        a[..., c] += 20
        images.append(Image.fromarray(a.astype(np.uint8)))
    return images, labels


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained run directory and its export by `headsurgeon collapse`, with the test images."""
    d = tmp_path_factory.mktemp("clients")
    torch.manual_seed(0)
    tree = hs.split("test_resnet", at=["layer4"], heads=2, num_classes=3, input_size=[3, 32, 32], seed=1)
    data_cfg = eval_config(from_flat(flatten(RECIPE, "recipe")), tree.spec.pretrained_cfg)
    transform = timm.data.create_transform(**data_cfg)
    images, labels = colours(48, seed=1)
    x, y = torch.stack([transform(i) for i in images]), torch.tensor(labels)
    opt = torch.optim.SGD(tree.parameters(), lr=0.05, momentum=0.9)
    tree.train()
    for step in range(12):
        idx = torch.arange(step * 12, step * 12 + 12) % len(x)
        loss = sum(F.cross_entropy(out, y[idx]) for out in tree(x[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    tree.eval()
    test_images, test_labels = colours(12, seed=2)
    xt = torch.stack([transform(i) for i in test_images])
    with torch.no_grad():
        top1 = [100.0 * (out.argmax(-1) == torch.tensor(test_labels)).float().mean().item() for out in tree(xt)]
    summary = {"heads": [{"index": h, "val_top1": top1[h], "test_top1": top1[h]} for h in range(2)],
               "best_head": 1, "best_epoch": 1, "epochs": 1, "epochs_done": 1, "finished": True, "num_classes": 3,
               "label_names": LABELS, "samples": {"train": 48, "val": 12, "test": 12}}
    tree.save(d / "run" / "best")
    (d / "run" / "summary.json").write_text(json.dumps(summary))
    (d / "run" / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    r = CliRunner().invoke(main, ["collapse", str(d / "run"), "-o", str(d / "out")])
    assert r.exit_code == 0, r.output
    return {"dir": d, "out": d / "out", "images": test_images, "labels": test_labels, "top1": top1[1],
            "model": timm.create_model(f"local-dir:{d / 'out'}", pretrained=True).eval()}


def timm_inputs(run) -> torch.Tensor:
    """The test images as timm preprocesses them for the exported model (its config.json)."""
    m = run["model"]
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=m))
    return torch.stack([transform(i) for i in run["images"]])


def reference(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The timm model's float32 logits, its float64 logits and the tolerance any float32 client gets.

    A client computes the same ops in float32 in another order (transformers' weights are not 64-byte
    aligned, so oneDNN takes other kernels; the ONNX graph has BatchNorm folded into the convolutions), so it
    rounds differently but by as much as timm's own float32 logits differ from the float64 ones: allow
    4x that, plus 4u of the largest logit (2 ulp) so that an exact timm still leaves room.
    """
    with torch.no_grad():
        y32 = model(x)
        y64 = copy.deepcopy(model).double()(x.double())
    err = (y32.double() - y64).abs().max().item()
    return y32, y64, 4 * err + 4 * U * y64.abs().max().item()


def check_top1(logits: torch.Tensor, tol: float) -> torch.Tensor:
    """argmax, after checking that no top-2 gap is within ``tol`` (else the client may rightly pick the other)."""
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min().item() > 2 * tol, "a near tie: the top-1 comparison would mean nothing"
    return logits.argmax(-1)


class PreLogits(torch.nn.Module):
    """timm's pooled features, what transformers' TimmWrapperModel returns as ``pooler_output``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def test_config_json_is_timms_with_num_classes_top_level_only(run, tmp_path):
    """What timm's save_for_hf writes for the same model, except model_args' copy of num_classes
    (transformers passes num_classes itself: a TypeError otherwise); the card still proves the files."""
    from timm.models import save_for_hf

    ours = json.loads((run["out"] / "config.json").read_text())
    assert verify(run["out"]) is None  # the card's sha256 are of the files as finally written
    tree = hs.HeadTree.load(run["dir"] / "run" / "best")
    model = hs.collapse(tree, 1)
    hs.export(model, tmp_path / "plain", label_names=LABELS)  # no data_config: pretrained_cfg as timm writes it
    save_for_hf(model, str(tmp_path / "timm"), model_config={"label_names": LABELS}, safe_serialization=True)
    plain, theirs = (json.loads((tmp_path / p / "config.json").read_text()) for p in ("plain", "timm"))
    assert theirs["model_args"].pop("num_classes") == theirs["num_classes"] == 3  # timm 1.0.31 writes it twice
    assert plain == theirs
    assert list(ours) == list(theirs) == ["architecture", "num_classes", "num_features", "global_pool", "label_names",
                                          "model_args", "pretrained_cfg"]
    assert ours["model_args"] == theirs["model_args"] == {"in_chans": 3, "global_pool": "avg"}
    assert ours["label_names"] == LABELS and ours["architecture"] == "test_resnet"
    assert ours["pretrained_cfg"]["num_classes"] == 3 and "label_names" not in ours["pretrained_cfg"]
    weights = [(tmp_path / p / "model.safetensors").read_bytes() for p in ("plain", "timm")]
    assert weights[0] == weights[1]


def test_transformers_model_and_processor(run):
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

    out, m = str(run["out"]), run["model"]
    config = AutoConfig.from_pretrained(out)
    assert type(config).__name__ == "TimmWrapperConfig" and config.architecture == "test_resnet"
    assert config.id2label == dict(enumerate(LABELS)) and config.label2id == {n: i for i, n in enumerate(LABELS)}
    processor = AutoImageProcessor.from_pretrained(out)  # from config.json's pretrained_cfg
    inputs = processor(run["images"])
    x = timm_inputs(run)
    assert torch.equal(inputs["pixel_values"], x)  # the same timm transform, so the same tensors
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    y32, y64, tol = reference(m, x)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits.double() - y64).abs().max().item() <= tol
    assert torch.equal(check_top1(logits, tol), y32.argmax(-1))
    # the backbone alone (it passes num_classes=0, so it hit the same duplicate): its pooled features are timm's
    backbone = AutoModel.from_pretrained(out).eval()
    _, f64, ftol = reference(PreLogits(m), x)
    with torch.no_grad():
        pooled = backbone(**inputs).pooler_output
    assert pooled.shape == f64.shape and (pooled.double() - f64).abs().max().item() <= ftol


def test_pipeline_labels_and_scores_what_the_run_reported(run):
    from huggingface_hub import ModelCard
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(run["out"]), top_k=3)
    got = classify(run["images"])
    y32, y64, tol = reference(run["model"], timm_inputs(run))
    top1 = check_top1(y32, tol)
    assert [g[0]["label"] for g in got] == [LABELS[i] for i in top1]
    # softmax moves by at most half the largest logit change (its Jacobian's rows sum to 2p(1-p) <= 1/2)
    p64 = y64.softmax(-1)
    for g, p in zip(got, p64):
        assert sorted(s["label"] for s in g) == sorted(LABELS)
        assert max(abs(s["score"] - p[LABELS.index(s["label"])].item()) for s in g) <= tol / 2 + 4 * U
    accuracy = 100.0 * np.mean([g[0]["label"] == LABELS[c] for g, c in zip(got, run["labels"])])
    card = ModelCard.load(run["out"] / "README.md")
    reported = {r.metric_config: r.metric_value for r in card.data.eval_results}
    assert accuracy == pytest.approx(run["top1"]) and reported["top1"] == round(accuracy, 2)


def test_onnx_runtime_gives_the_logits(run, tmp_path):
    import onnx
    import onnxruntime as ort

    m, x = run["model"], timm_inputs(run)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        # the TorchScript exporter: the default (dynamo) one needs onnxscript and took ~30 s here, not ~4 s
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(m, (x,), str(path), dynamo=False, input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    y32, y64, tol = reference(m, x)
    logits = torch.from_numpy(session.run(["logits"], {"pixel_values": x.numpy()})[0])
    assert (logits.double() - y64).abs().max().item() <= tol
    assert torch.equal(check_top1(logits, tol), y32.argmax(-1))
    one = torch.from_numpy(session.run(["logits"], {"pixel_values": x[:1].numpy()})[0])  # the batch size is free
    assert one.shape == (1, 3) and (one.double() - y64[:1]).abs().max().item() <= tol
