"""`python -m paper_figures --llm-logs DIR`: PPO vs RTO curves from rto_llm `metrics.jsonl` files.

Every sub-folder of DIR holding a `metrics.jsonl` (one JSON object per line with "step" and metric
names) is one run, labelled by its folder name. Panels: RM score, KL, response length, and the share of
the return coming from DPO token rewards (RTO only). A panel whose metric no run logged is left out and
listed in the caption."""

from __future__ import annotations

import json
from pathlib import Path

from .style import plt, save

PANELS = {
    "reward-model score": ["objective/scores", "objective/rlhf_reward"],
    "KL to reference (sum of k1 per sequence)": ["objective/kl"],
    "response length (mean tokens)": ["val/response_length"],
    "share of return from DPO rewards": ["rto/share_dpo"],
}


def read_runs(folder: Path) -> dict[str, list[dict]]:
    runs = {}
    for f in sorted(Path(folder).rglob("metrics.jsonl")):
        rows = []
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{i}: not a JSON line ({e}); fix or remove the line") from e
        if rows:
            runs[str(f.parent.relative_to(folder)) or f.parent.name] = rows
    if not runs:
        raise ValueError(f"--llm-logs {folder}: no metrics.jsonl found below it (rto_llm writes one per run)")
    return runs


def draw(folder: Path, out: Path) -> list[Path]:
    runs = read_runs(Path(folder))
    panels = {t: keys for t, keys in PANELS.items()
              if any(any(k in r for r in rows for k in keys) for rows in runs.values())}
    missing = [t for t in PANELS if t not in panels]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.4 * max(len(panels), 1), 2.8), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels.items()):
        for name, rows in runs.items():
            key = next((k for k in keys if any(k in r for r in rows)), None)
            if key is None:
                continue
            pts = [(r["step"], r[key]) for r in rows if key in r and isinstance(r[key], (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=name)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("PPO step")
    axes[0][0].legend(fontsize=7)
    cap = f"rto_llm runs from {folder}: {', '.join(runs)}" + (f"; not logged: {', '.join(missing)}" if missing else "")
    return save(fig, out, "LLM_ppo_vs_rto", cap)
