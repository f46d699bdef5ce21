"""Pictures for people deciding on settings (matplotlib, imported only when a picture is drawn)."""

from __future__ import annotations

import io
from pathlib import Path

from .io import atomic_write_bytes


def router_histogram(distances: dict[str, list[float]], epsilon: float, max_distance: float, xlabel: str,
                     path: str | Path, title: str = "") -> Path:
    """Overlaid histograms of router distance per query kind, with epsilon marked; a PNG at `path`.
    Left of the line the neuron fires: edit prompts and rephrases should be there, locality not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [max_distance * i / 80 for i in range(81)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, values in distances.items():
        fired = 100.0 * sum(v < epsilon for v in values) / max(len(values), 1)
        ax.hist(values, bins=bins, alpha=0.5, label=f"{name} (n={len(values)}, {fired:.1f}% fire)")
    ax.axvline(epsilon, color="black", linestyle="--", label=f"epsilon = {epsilon:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("queries")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
