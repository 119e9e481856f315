"""The long-schedule study's gates (issue 28; ../shared/research/regime.md §5), from finished single-model cells.

    G1  clean: train fit (eval mode, un-augmented, against the training labels) >= 99.5 % at the last epoch
    G2  40 % noise: >= 80 % of the flipped training labels memorised at the last epoch, and the final test
        error >= 2 pp above the best evaluated epoch's
    G3  the ensemble of the independent single runs (seeds) beats the mean single run by >= 1 pp clean or
        >= 2 pp at 40 % noise, final epoch (averaged softmax of the saved test logits)

    python benchmarks/long_gates.py [FOLDER ...]   # default: every calib/* folder of the long study

Prints one table per folder (a calibration configuration) and writes FOLDER/gates.json. A gate with too
few cells says so instead of passing or failing.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from headsurgeon.compare import read_cells  # last line per cell key; a cut line is one clear error

ROOT = Path(__file__).resolve().parents[1]
LONG = ROOT / "benchmarks" / "results" / "paper" / "fashion-mnist-long"


def _cells(folder: Path) -> list[dict[str, Any]]:
    return [c for c in read_cells(folder) if c["row"] == "single"]


def ensemble_gain(folder: Path, cells: list[dict[str, Any]], sub: str) -> dict[str, Any] | None:
    import numpy as np

    logits, accs, labels = [], [], None
    for c in sorted(cells, key=lambda c: c["seed"]):
        with np.load(folder / "predictions" / c["predictions"]) as z:
            if f"{sub}_logits" not in z.files:
                return None
            x = z[f"{sub}_logits"].astype(np.float64)
            labels = z["labels"]
        p = np.exp(x - x.max(1, keepdims=True))
        logits.append(p / p.sum(1, keepdims=True))
        accs.append(100 * float((x.argmax(1) == labels).mean()))
    ens = 100 * float((np.mean(logits, 0).argmax(1) == labels).mean())
    return {"runs": len(cells), "mean_single": statistics.fmean(accs), "ensemble": ens,
            "gain": ens - statistics.fmean(accs)}


def gates(folder: Path) -> dict[str, Any]:
    cells = _cells(folder)
    out: dict[str, Any] = {"folder": str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder),
                           "config": json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file()
                           else None}
    clean = [c for c in cells if c["noise"] == 0]
    noisy = [c for c in cells if abs(c["noise"] - 0.4) < 1e-9]
    if clean:
        fits = [c["fit_last"]["fit_noisy"] for c in clean]
        out["G1"] = {"train_fit": fits, "pass": min(fits) >= 99.5, "seeds": [c["seed"] for c in clean],
                     "test_final": [c["final"]["deployed"] for c in clean]}
    if noisy:
        mem = [c["fit_last"]["memorised"] for c in noisy]
        # best evaluated epoch's test accuracy of the mean head (the curve every cell records) vs the final one
        rise = []
        for c in noisy:
            curve = c["test_mean_head_curve"]
            rise.append(max(curve) - curve[-1])
        out["G2"] = {"memorised": mem, "final_err_minus_best_err": rise, "seeds": [c["seed"] for c in noisy],
                     "pass": min(mem) >= 80 and min(rise) >= 2,
                     "deployed_early_stopped": [c["best"]["deployed"] for c in noisy],
                     "final": [c["final"]["deployed"] for c in noisy]}
    for name, cs, need in (("G3_clean", clean, 1.0), ("G3_noisy", noisy, 2.0)):
        if len(cs) >= 2:
            g = {sub: ensemble_gain(folder, cs, sub) for sub in ("last", "best")}
            out[name] = {**g, "threshold": need, "pass": g["last"] is not None and g["last"]["gain"] >= need}
        else:
            out[name] = {"pending": f"{len(cs)} single run(s); the ceiling needs >= 2 seeds (the design: 4)"}
    return out


def main(argv: list[str]) -> int:
    folders = [Path(a) for a in argv] or sorted(p for p in (LONG / "calib").glob("*") if p.is_dir())
    for f in folders:
        g = gates(f)
        (f / "gates.json").write_text(json.dumps(g, indent=1) + "\n")
        print(f"== {g['folder']}")
        if "G1" in g:
            print(f"G1 clean train fit {g['G1']['train_fit']} (>= 99.5: {'pass' if g['G1']['pass'] else 'FAIL'}); "
                  f"final test {g['G1']['test_final']}")
        else:
            print("G1 pending (no finished clean cell)")
        if "G2" in g:
            print(f"G2 40 %: memorised {g['G2']['memorised']} (>= 80), final - best test error "
                  f"{[round(x, 2) for x in g['G2']['final_err_minus_best_err']]} pp (>= 2): "
                  f"{'pass' if g['G2']['pass'] else 'FAIL'}")
        else:
            print("G2 pending (no finished 40 % cell)")
        for k in ("G3_clean", "G3_noisy"):
            v = g[k]
            print(f"{k}: {v['pending']}" if "pending" in v else
                  f"{k}: ensemble of {v['last']['runs']} {v['last']['ensemble']:.2f} vs mean single "
                  f"{v['last']['mean_single']:.2f} = {v['last']['gain']:+.2f} pp (>= {v['threshold']}): "
                  f"{'pass' if v['pass'] else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
