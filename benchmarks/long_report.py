"""The long-schedule study's report (issue 28; ../shared/research/regime.md §5): paired gains, McNemar tests,
the ensemble ceiling and a verdict per claim, from the finished cells of ``benchmarks/paper.py --dataset
fashion-mnist-long``; and the memorised-fraction curves as a plot.

    python benchmarks/long_report.py [FOLDER] [--plot docs/img/long_memorised.png]

Writes FOLDER/report.md and FOLDER/report.json. The decision rules are fixed here, before any number (they
are regime.md §5's, completed for the claims it does not name):

- every comparison pairs two rows on the same seed (same data order, the same noise draw); the gain is the
  mean paired difference in test top-1 (pp, + = the first row better) ± its SE over seeds; a difference
  *holds* only if |gain| > 2 SE with >= 3 pairs; fewer pairs give a number and no verdict (with 3 pairs
  2 SE is a liberal bar, about an 82 % interval of Student's t with 2 df: the paired t-test's p is
  printed beside every gain);
- *final*: each row's validation-chosen head at the last epoch (no early stopping); *early-stopped*: the
  validation-chosen epoch and head (the validation labels carry the noise), what ``collapse`` exports;
- generalisation, "reproduced in-regime": hier4 > single at the final epoch at both 0 % and 40 % noise;
- noise robustness: hier4 > single early-stopped at 40 %; a row that beats only the final-epoch single is
  "delayed memorisation", not a generalisation gain;
- rescaling: hier4 vs hier4-norescale; consensus vs Ind: hier4 vs ind4; late consensus: hier4-late (beta 1 ->
  0.1 over the run) vs hier4, the memorised-fraction curves say whether it delays memorisation; sharing vs instances: hier4 (4 heads
  on one trunk) vs dml2 and kdcl2 (2 independent networks exchanging logits): each at the final and the
  early-stopped epoch;
- the ceiling beside each gain is gate G3's: what the softmax ensemble of the independent single runs gains
  over the mean single run, at the same epoch choice.

McNemar: the exact two-sided test (``headsurgeon.compare.mcnemar``) on the two rows' test predictions
pooled over the paired seeds. The seeds share the test images, so the pooled images are not independent
draws: read p as a per-image consistency check beside the seed-level SE, not as a second, independent test.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from long_gates import LONG, ensemble_gain  # noqa: E402

from headsurgeon.compare import mcnemar, read_cells, se  # noqa: E402

NOISES = (0.0, 0.4)
WHEN = {"final": ("final", "last"), "early": ("best", "best")}  # the cell's key, the checkpoint (its predictions)
CLAIMS = [  # (claim, row a, row b), each at every noise level; + = a better
    ("gain over single", "hier4", "single"), ("gain over single", "hier4-norescale", "single"),
    ("gain over single", "ind4", "single"), ("gain over single", "one4", "single"),
    ("gain over single", "dml2", "single"), ("gain over single", "kdcl2", "single"),
    ("gain over single", "pcl4", "single"), ("gain over single", "hier4-late", "single"),
    ("late consensus", "hier4-late", "hier4"),
    ("rescaling", "hier4", "hier4-norescale"), ("consensus vs Ind", "hier4", "ind4"),
    ("sharing vs instances", "hier4", "dml2"), ("sharing vs instances", "hier4", "kdcl2"),
]
MIN_PAIRS = 3


@functools.lru_cache(maxsize=None)
def _predictions(path: Path) -> dict[str, Any]:
    """A cell's saved test predictions, read once (every claim and table pairing the cell reads them)."""
    import numpy as np

    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _deployed(folder: Path, cell: dict[str, Any], when: str) -> tuple[Any, Any]:
    """The cell's deployed test predictions at ``when`` and the labels, checked against the accuracy the
    cell recorded (the saved predictions are what the numbers were computed from)."""
    key, sub = WHEN[when]
    z = _predictions(folder / "predictions" / cell["predictions"])
    pred, labels = z[f"{sub}_preds"][cell[key]["chosen"]], z["labels"]
    acc = 100 * float((pred == labels).mean())
    if abs(acc - cell[key]["deployed"]) > 0.006:  # recorded to 2 decimals
        raise SystemExit(f"error: {cell['predictions']}: {when} predictions give {acc:.2f} %, the cell recorded "
                         f"{cell[key]['deployed']} %; re-run the cell")
    return pred, labels


def compare_rows(folder: Path, cells: list[dict[str, Any]], a: str, b: str, noise: float, when: str) -> dict[str, Any] | None:
    by = {(c["row"], c["seed"]): c for c in cells if abs(c["noise"] - noise) < 1e-9}
    seeds = sorted(s for (r, s) in by if r == a and (b, s) in by)
    if not seeds:
        return None
    key = WHEN[when][0]
    d = [by[a, s][key]["deployed"] - by[b, s][key]["deployed"] for s in seeds]
    only_a = only_b = images = 0
    for s in seeds:
        pa, y = _deployed(folder, by[a, s], when)
        pb, _ = _deployed(folder, by[b, s], when)
        ra, rb = pa == y, pb == y
        only_a += int((ra & ~rb).sum())
        only_b += int((~ra & rb).sum())
        images += len(y)
    g, s_ = statistics.fmean(d), se(d)
    t_p = None
    if s_:  # the paired t-test's two-sided p, beside the 2-SE rule (with 3 pairs, 2 SE is an ~82 % interval)
        from scipy.stats import t as student

        t_p = float(2 * student.sf(abs(g) / s_, len(d) - 1))
    holds = None
    if len(d) >= MIN_PAIRS and s_ is not None:
        holds = "a" if g > 2 * s_ else "b" if g < -2 * s_ else "neither"
    return {"seeds": seeds, "gain": g, "se": s_, "t_p": t_p, "diffs": d, "holds": holds,
            "mcnemar": {"only_a": only_a, "only_b": only_b, "images": images, "p": mcnemar(only_a, only_b)}}


def ceiling(folder: Path, cells: list[dict[str, Any]], noise: float, when: str) -> dict[str, Any] | None:
    single = [c for c in cells if c["row"] == "single" and abs(c["noise"] - noise) < 1e-9]
    return ensemble_gain(folder, single, WHEN[when][1]) if len(single) >= 2 else None


def disagreement(folder: Path, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Diversity, the room an ensemble has: the mean pairwise share of test images on which two heads of one
    cell predict different classes, per row, beside the same share between independent single runs (their
    deployed heads, seed against seed), at the final and the early-stopped checkpoint."""
    import itertools

    def pairwise(preds: list[Any]) -> float:
        return 100 * statistics.fmean(float((a != b).mean()) for a, b in itertools.combinations(preds, 2))

    out = []
    for n in NOISES:
        at = [c for c in cells if abs(c["noise"] - n) < 1e-9]
        for row in dict.fromkeys(c["row"] for c in sorted(at, key=lambda c: c["row"] != "single")):
            cs = [c for c in at if c["row"] == row]
            entry: dict[str, Any] = {"row": row, "noise": n, "cells": len(cs)}
            for when, (_, sub) in WHEN.items():
                if row == "single":
                    if len(cs) < 2:
                        break
                    entry[when] = pairwise([_deployed(folder, c, when)[0] for c in cs])
                else:
                    entry[when] = statistics.fmean(  # the heads: the last row is the ensemble
                        pairwise(list(_predictions(folder / "predictions" / c["predictions"])[f"{sub}_preds"][:-1]))
                        for c in cs)
            else:
                out.append(entry)
    return out


def report(folder: Path, cells: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"folder": str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder),
                           "cells": len(cells), "min_pairs": MIN_PAIRS, "ceiling": {}, "claims": [], "verdicts": {}}
    for n in NOISES:
        out["ceiling"][f"{n:g}"] = {w: ceiling(folder, cells, n, w) for w in WHEN}
    for claim, a, b in CLAIMS:
        for n in NOISES:
            res = {w: compare_rows(folder, cells, a, b, n, w) for w in WHEN}
            if any(res.values()):
                out["claims"].append({"claim": claim, "a": a, "b": b, "noise": n, **res})
    out["verdicts"] = verdicts(out["claims"])
    out["rows"] = rows_summary(cells)
    out["disagreement"] = disagreement(folder, cells)
    return out


def _find(claims: list[dict[str, Any]], a: str, b: str, n: float, when: str) -> dict[str, Any] | None:
    for c in claims:
        if c["a"] == a and c["b"] == b and abs(c["noise"] - n) < 1e-9:
            return c[when]
    return None


def _pending(*rs: dict[str, Any] | None) -> str | None:
    if any(r is None for r in rs):
        return "pending (no paired cells yet)" if len(rs) == 1 else "pending (a noise level has no paired cells yet)"
    if any(r["holds"] is None for r in rs):
        return f"pending ({' and '.join(str(len(r['seeds'])) for r in rs)} of {MIN_PAIRS} paired seeds)"
    return None


def verdicts(claims: list[dict[str, Any]]) -> dict[str, str]:
    v: dict[str, str] = {}
    f0, f4 = _find(claims, "hier4", "single", 0.0, "final"), _find(claims, "hier4", "single", 0.4, "final")
    p = _pending(f0, f4)
    v["generalisation (hier4 > single, final epoch, 0 % and 40 %)"] = p or (
        "reproduced in-regime" if f0["holds"] == f4["holds"] == "a" else
        "not reproduced: " + ", ".join(f"{n}: {'better' if r['holds'] == 'a' else 'worse' if r['holds'] == 'b' else 'no difference beyond 2 SE'}"
                                      for n, r in (("0 %", f0), ("40 %", f4))))
    e4 = _find(claims, "hier4", "single", 0.4, "early")
    p = _pending(e4, f4)
    v["noise robustness (hier4 > single early-stopped, 40 %)"] = p or (
        "robust to noise" if e4["holds"] == "a" else
        "delayed memorisation only (beats the final-epoch single, not the early-stopped one)" if f4["holds"] == "a"
        else "not robust: " + ("worse" if e4["holds"] == "b" else "no difference beyond 2 SE") + " early-stopped")
    for name, a, b in (("rescaling (hier4 vs hier4-norescale)", "hier4", "hier4-norescale"),
                       ("consensus vs Ind (hier4 vs ind4)", "hier4", "ind4"),
                       ("late consensus (hier4-late vs hier4)", "hier4-late", "hier4"),
                       ("sharing vs instances (hier4 vs dml2)", "hier4", "dml2"),
                       ("sharing vs instances (hier4 vs kdcl2)", "hier4", "kdcl2")):
        parts = []
        for n in NOISES:
            for w in WHEN:
                r = _find(claims, a, b, n, w)
                pend = _pending(r)
                parts.append(f"{_pct(n)} {w}: " + (pend or {"a": f"{a} better", "b": f"{b} better",
                                                          "neither": "no difference beyond 2 SE"}[r["holds"]]))
        v[name] = "; ".join(parts)
    return v


def rows_summary(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for (row, n) in sorted({(c["row"], c["noise"]) for c in cells}, key=lambda k: (k[1], k[0] != "single", k[0])):
        cs = [c for c in cells if c["row"] == row and c["noise"] == n]
        mem = [c["fit_last"].get("memorised") for c in cs if c["fit_last"].get("memorised") is not None]
        out.append({"row": row, "noise": n, "seeds": sorted(c["seed"] for c in cs),
                    "final": statistics.fmean(c["final"]["deployed"] for c in cs),
                    "early": statistics.fmean(c["best"]["deployed"] for c in cs),
                    "best_epoch": statistics.fmean(c["best_epoch"] for c in cs),
                    "fit_true": statistics.fmean(c["fit_last"]["fit_true"] for c in cs),
                    "memorised": statistics.fmean(mem) if mem else None,
                    "wall_s": statistics.fmean(c["wall_s"] for c in cs)})
    return out


def _g(r: dict[str, Any] | None) -> str:
    if r is None:
        return "–"
    s = f"{r['gain']:+.2f}" + (f" ± {r['se']:.2f}" if r["se"] is not None else "")
    t = f"; t p {r['t_p']:.2g}" if r.get("t_p") is not None else ""
    return f"{s} ({len(r['seeds'])}{t}; McNemar p {r['mcnemar']['p']:.2g})"


def _pct(n: float) -> str:
    return f"{n * 100:.0f} %"


def _ceil(c: dict[str, Any] | None) -> str:
    return "" if c is None else f"{c['gain']:+.2f} ({c['runs']} runs)"


def markdown(rep: dict[str, Any]) -> str:
    L = ["Paired gains in pp of test top-1 (+ = the first row better) ± SE over seeds (number of paired seeds; "
         "the paired t-test's p; exact McNemar p on the predictions pooled over those seeds). *final*: the "
         "validation-chosen head at the last epoch; *early-stopped*: the validation-chosen epoch and head (noisy "
         "validation labels). Ceiling, beside the gains over the single model: the ensemble of the independent "
         "single runs minus the mean single run at the same epoch choice (gate G3). A difference holds only "
         f"beyond 2 SE with >= {MIN_PAIRS} pairs.", "",
         "| comparison | noise | final | early-stopped | ceiling final | ceiling early-stopped |", "|---|---|---|---|---|---|"]
    for c in rep["claims"]:
        ce = rep["ceiling"][f"{c['noise']:g}"] if c["b"] == "single" else {"final": None, "early": None}
        L.append(f"| {c['claim']}: {c['a']} vs {c['b']} | {_pct(c['noise'])} | {_g(c['final'])} | {_g(c['early'])} | "
                 f"{_ceil(ce['final'])} | {_ceil(ce['early'])} |")
    L += ["", "| row | noise | seeds | test final % | test early-stopped % | chosen epoch | train fit, true labels % | "
          "flipped labels memorised % | wall s / cell (resumed cells: the resumed part) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        mem = "–" if r["memorised"] is None else f"{r['memorised']:.1f}"
        L.append(f"| {r['row']} | {_pct(r['noise'])} | {','.join(map(str, r['seeds']))} | {r['final']:.2f} | "
                 f"{r['early']:.2f} | {r['best_epoch']:.0f} | {r['fit_true']:.1f} | {mem} | {r['wall_s']:.0f} |")
    L += ["", "Diversity: mean pairwise disagreement on the test images (%) between the heads of one cell (mean over "
          "its seeds), and for `single` between independent runs (seed against seed).", "",
          "| row | noise | cells | final | early-stopped |", "|---|---|---|---|---|"]
    L += [f"| {d['row']} | {_pct(d['noise'])} | {d['cells']} | {d['final']:.1f} | {d['early']:.1f} |"
          for d in rep["disagreement"]]
    L += ["", "Verdicts (the rules in `benchmarks/long_report.py`'s docstring):", ""]
    L += [f"- **{k}**: {v}" for k, v in rep["verdicts"].items()]
    return "\n".join(L) + "\n"


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    """Memorised share of the flipped labels and test accuracy (mean head) against the epoch, at 40 % noise,
    one line per row (mean over its seeds, the band spans them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    noisy = [c for c in cells if abs(c["noise"] - 0.4) < 1e-9 and c.get("fit_curve")]
    rows = list(dict.fromkeys(c["row"] for c in sorted(noisy, key=lambda c: c["row"] != "single")))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        cs = [c for c in noisy if c["row"] == row]
        ep = [f["epoch"] for f in cs[0]["fit_curve"]]
        mem = np.array([[f["memorised"] for f in c["fit_curve"]] for c in cs], dtype=float)
        (line,) = ax1.plot(ep, mem.mean(0), label=f"{row} ({len(cs)})")
        ax1.fill_between(ep, mem.min(0), mem.max(0), color=line.get_color(), alpha=0.2)
        te = np.array([c["test_mean_head_curve"] for c in cs], dtype=float)
        ax2.plot(cs[0]["eval_epochs"], te.mean(0), color=line.get_color())
        ax2.fill_between(cs[0]["eval_epochs"], te.min(0), te.max(0), color=line.get_color(), alpha=0.2)
    for ax, t in ((ax1, "flipped training labels memorised (%)"), (ax2, "test top-1, mean head (%)")):
        ax.set_xlabel("epoch")
        ax.set_title(t, fontsize=10)
        ax.grid(alpha=0.3)
    ax1.legend(title="row (seeds)", fontsize=8)
    fig.suptitle("Fashion-MNIST long schedule, 40 % symmetric noise (10,000 training images, resnet10t 28 px)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", nargs="?", default=str(LONG))
    ap.add_argument("--plot", help="write the memorised-fraction curves to this PNG")
    a = ap.parse_args(argv)
    folder = Path(a.folder)
    if not (folder / "cells.jsonl").is_file():
        raise SystemExit(f"error: no cells.jsonl in {folder}; run benchmarks/long_grid.sh first")
    cells = read_cells(folder)
    rep = report(folder, cells)
    text = markdown(rep)
    (folder / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
    (folder / "report.md").write_text(text)
    print(text)
    if a.plot:
        plot(cells, Path(a.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
