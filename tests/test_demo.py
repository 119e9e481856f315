"""The demo is the whole pipeline: train tree + single model, collapse, reload in a fresh process."""
from headsurgeon.pipeline import demo


def test_demo_one_epoch(tmp_path):
    lines = []
    res = demo(tmp_path / "d", epochs=1, log=lines.append)
    tree, head = res["tree"], res["head"]
    assert head == tree["best_head"] and res["single"]["heads"][0]["index"] == 0 and len(tree["heads"]) == 4
    # the collapsed head, reloaded by timm alone in another process, scores what the run reported
    assert res["reloaded"]["class"] == "ResNet" and res["reloaded"]["n"] == 360
    assert res["reloaded"]["test_top1"] == tree["heads"][head]["test_top1"]
    text = lines[-1]
    assert "single model (same budget)" in text and f"collapsed head {head}, reloaded by timm" in text
    assert (tmp_path / "d" / "model" / "README.md").is_file()
