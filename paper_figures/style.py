"""One consistent figure style; every figure is saved as PNG and PDF with a caption line."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
                     "axes.spines.top": False, "axes.spines.right": False})


def run_info(summary: dict, digits: int = 0) -> str:
    """The end of every caption: "config <hash>; wall <seconds>s" of the experiment's summary."""
    return f"config {summary['config_hash']}; wall {summary['wall_time_s']:.{digits}f}s"


def save(fig, out: Path, stem: str, caption: str) -> list[Path]:
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    fig.text(0.01, -0.02, caption, fontsize=6.5, color="0.35", ha="left", va="top", wrap=True)
    paths = []
    for ext in ("png", "pdf"):
        p = folder / f"{stem}.{ext}"
        fig.savefig(p, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    return paths
