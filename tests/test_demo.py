"""The demo is the whole pipeline: train tree + single model, collapse, reload in a fresh process,
and a closing screen with uncertainties, a plot and the push command."""
import pytest
from huggingface_hub import ModelCard

from headsurgeon.errors import HeadsurgeonError
from headsurgeon.hub import verify
from headsurgeon.pipeline import DEMO_SETS, demo, difference, table


def test_demo_one_epoch(tmp_path):
    lines = []
    res = demo(tmp_path / "d", epochs=1, log=lines.append, progress=False)
    tree, head = res["tree"], res["head"]
    assert head == tree["best_head"] and res["single"]["heads"][0]["index"] == 0 and len(tree["heads"]) == 4
    # the collapsed head, reloaded by timm alone in another process, scores what the run reported
    assert res["reloaded"]["class"] == "ResNet" and res["reloaded"]["n"] == 360
    assert res["reloaded"]["test_top1"] == tree["heads"][head]["test_top1"]
    text = lines[-1]
    assert "single model (same budget)" in text and f"collapsed head {head}, reloaded by timm" in text
    assert "test top-1 ± SE" in text and "docs/paper.md" in text
    assert f"push it: headsurgeon push {tmp_path / 'd' / 'model'} --repo " in text
    assert res["plot"] == str(tmp_path / "d" / "demo.png") and (tmp_path / "d" / "demo.png").stat().st_size > 10_000
    assert f"plot (accuracy per epoch, each head vs the single model): {res['plot']}" in text
    # one screen: a line per model, not per epoch
    assert sum(len(x.splitlines()) for x in lines) <= 30, "\n".join(lines)
    # the card carries the single model as the baseline, and the folder is still a verified collapse output
    model = tmp_path / "d" / "model"
    names = [e.metric_name for e in ModelCard.load(model / "README.md").data.eval_results]
    assert any("single model" in m and "baseline" in m for m in names) and any("ensemble" in m for m in names)
    assert verify(model) is None


def test_demo_configuration_is_the_one_the_evidence_favours():
    assert "split.at=[input]" in DEMO_SETS and "data.label_noise=0.2" in DEMO_SETS


def test_demo_refuses_zero_epochs(tmp_path):
    with pytest.raises(HeadsurgeonError, match="--epochs must be at least 1"):
        demo(tmp_path / "d", epochs=0, log=lambda m: None)
    assert not (tmp_path / "d").exists()


def _result(single: float, chosen: float, n: int = 360) -> dict:
    heads = [{"index": i, "val_top1": 90.0, "test_top1": chosen} for i in range(2)]
    return {"single": {"heads": [{"index": 0, "val_top1": 90.0, "test_top1": single}]},
            "tree": {"heads": heads, "ensemble": {"val_top1": 91.0, "test_top1": chosen}, "best_head": 0},
            "head": 0, "reloaded": {"test_top1": chosen, "n": n, "class": "ResNet"}, "output": "out"}


def test_the_table_says_whether_a_difference_is_resolved():
    d, se, resolved = difference(98.89, 99.72, 360)  # the case: 3 images out of 360
    assert d == pytest.approx(-0.83) and not resolved and se == pytest.approx(0.62, abs=0.01)
    text = table(_result(99.72, 98.89))
    assert "within 2 SE" in text and "does not resolve" in text and "below the single model" in text
    assert "one image is 0.28 pp" in text
    text = table(_result(80.0, 90.0))
    assert "a resolved difference" in text and "10.00 pp above" in text
    assert "+10.00 ± 2.64" in text
