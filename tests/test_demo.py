"""The demo is the whole pipeline: a paired compare over seeds, the winner collapsed, reloaded in a fresh
process, and a closing screen with the paired gain ± SE, a plot and the push command."""
import pytest
from huggingface_hub import ModelCard

from headsurgeon.demo import DEMO_SETS, NOISE, VARIANT, demo, table
from headsurgeon.errors import HeadsurgeonError
from headsurgeon.hub import verify


def test_demo_one_epoch(tmp_path):
    lines = []
    res = demo(tmp_path / "d", epochs=1, seeds=(0, 1), jobs=1, log=lines.append, progress=False)
    study, win = res["study"], res["winner"]
    rows = study["stats"][f"{NOISE:g}"]
    assert set(rows) == {"single", VARIANT} and rows[VARIANT]["pairs"] == 2 and rows[VARIANT]["heads"] == 4
    cell = next(c for c in __import__("headsurgeon.compare", fromlist=["read_cells"]).read_cells(tmp_path / "d" / "study")
                if c["key"] == win["cell"])
    # the collapsed head, reloaded by timm alone in another process, scores what its run reported
    assert res["head"] == cell["best_head"] and res["reloaded"]["class"] == "ResNet" and res["reloaded"]["n"] == 360
    assert res["reloaded"]["test_top1"] == pytest.approx(cell["best"]["deployed"], abs=1e-9)
    text = lines[-1]
    assert "single model (same budget)" in text and f"{VARIANT}: head chosen by validation" in text
    assert "paired seeds" in text and "McNemar" in text and "docs/paper.md" in text
    assert f"push it: headsurgeon push {tmp_path / 'd' / 'model'} --repo " in text
    assert study["plot"] and (tmp_path / "d" / "study" / "compare.png").stat().st_size > 5000
    # one screen: a line per cell and the table, not a line per epoch
    assert sum(len(x.splitlines()) for x in lines) <= 30, "\n".join(lines)
    model = tmp_path / "d" / "model"
    if win["variant"] == VARIANT:  # the card carries the paired single model as the baseline
        names = [e.metric_name for e in ModelCard.load(model / "README.md").data.eval_results]
        assert any("single model" in m and "baseline" in m for m in names) and any("ensemble" in m for m in names)
    assert verify(model) is None  # still a verified collapse output


def test_demo_configuration_is_the_one_the_evidence_favours():
    assert VARIANT == "inst4" and NOISE == 0.2 and "epochs=40" in DEMO_SETS


def test_demo_refuses_zero_epochs(tmp_path):
    with pytest.raises(HeadsurgeonError, match="--epochs must be at least 1"):
        demo(tmp_path / "d", epochs=0, log=lambda m: None)
    assert not (tmp_path / "d").exists()


def _result(gain: float, se: float | None) -> dict:
    var = {"seeds": [0, 1, 2], "deployed": 90 + gain, "final": 89 + gain, "ensemble": 91 + gain,
           "gain_deployed": gain, "se_deployed": se, "gain_final": gain, "se_final": se, "gain_ensemble": gain + 1,
           "se_ensemble": se, "mcnemar": {"only_variant": 30, "only_single": 20, "images": 1080, "p": 0.2}}
    stats = {f"{NOISE:g}": {"single": {"seeds": [0, 1, 2], "deployed": 90.0}, VARIANT: var}}
    return {"study": {"stats": stats, "plot": "p.png"}, "head": 1, "output": "out", "model": "out/model",
            "winner": {"variant": VARIANT, "cell": "inst4-n0.2-s1"},
            "reloaded": {"test_top1": 91.0, "n": 360, "class": "ResNet"}}


def test_the_table_says_whether_the_paired_gain_is_resolved():
    text = table(_result(0.5, 0.4))
    assert "within 2 SE (0.80 pp) over 3 paired seeds: not resolved" in text and "0.50 pp above" in text
    assert "+0.50 ± 0.40" in text and "30 images only inst4 gets right, 20 only the single model, p = 0.2" in text
    text = table(_result(-2.0, 0.5))
    assert "2.00 pp below the single model, more than 2 SE (1.00 pp)" in text and "resolved difference" in text
    assert "no standard error" in table(_result(1.0, None))
