"""Accuracy-per-epoch figures from plain rows (``metrics.jsonl``'s, see :class:`headsurgeon.summary.EpochRow`).

One plotting module for a run's ``curves.png`` (:meth:`headsurgeon.rundir.RunDir.plot`) and the demo's
figure; both draw each head's and the ensemble's validation and test top-1 per epoch. matplotlib is
optional: :func:`pyplot` is None without it, and the callers say so or skip the figure.
"""
from __future__ import annotations

from typing import Any, Sequence

SPLITS = ("val", "test")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def evaluated(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of evaluated epochs (recipe ``eval_every``): only they have ``val``/``test``."""
    return [r for r in rows if "val" in r]


def curves(plt: Any, rows: Sequence[dict[str, Any]]) -> Any:
    """A figure of two panels (val, test): each head's and the ensemble's top-1 per evaluated epoch."""
    rows = evaluated(rows)
    epochs = [h["epoch"] for h in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split_ in zip(axes, SPLITS):
        for i in range(len(rows[0][split_]["heads"])):
            ax.plot(epochs, [h[split_]["heads"][i]["top1"] for h in rows], label=f"head {i}")
        ax.plot(epochs, [h[split_]["ensemble"]["top1"] for h in rows], "k--", label="ensemble")
        ax.set_title(f"{split_} top-1 (%)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return fig


def versus_single(plt: Any, tree: Sequence[dict[str, Any]], single: Sequence[dict[str, Any]], head: int,
                  title: str) -> Any:
    """The demo's figure: every head of ``tree`` (``head``, the exported one, drawn bold), the ensemble
    and the single model ``single``, validation and test top-1 per epoch."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split in zip(axes, SPLITS):
        for i in range(len(tree[0][split]["heads"])):
            ax.plot([r["epoch"] for r in tree], [r[split]["heads"][i]["top1"] for r in tree], lw=2.2 if i == head else 1,
                    alpha=1 if i == head else 0.6, label=f"head {i}" + (" (exported)" if i == head else ""))
        ax.plot([r["epoch"] for r in tree], [r[split]["ensemble"]["top1"] for r in tree], "k:", label="ensemble")
        ax.plot([r["epoch"] for r in single], [r[split]["heads"][0]["top1"] for r in single], "k-", lw=2.2,
                label="single model")
        ax.set_title(f"{'validation' if split == 'val' else 'test'} top-1 (%)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    lo = min(min(r[s]["heads"][0]["top1"] for r in single[len(single) // 4:]) for s in SPLITS)
    axes[0].set_ylim(max(0, lo - 10), 100)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
