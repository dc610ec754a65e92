"""`python -m paper_figures --quick` end to end: every figure file and every REPORT row exists."""

import json
import subprocess
import sys
from pathlib import Path

EXPECTED = ["E0_identities", "E2_prop32_queries", "E1_token_vs_bandit", "E1b_error_vs_H", "E3_policy_quality",
            "E3_temperature",
            "E6_coverage", "E7_learning_curves", "E7_speedup_vs_H", "E7_advantage_snr", "E7_data_scaling",
            "E7_beta_sweep",
            "E5_overoptimization", "DPO_token_reward_heatmap", "LLM_ppo_vs_rto"]


def test_quick_regeneration_writes_every_figure_and_report_row(tmp_path):
    logs = tmp_path / "llm"
    for run, bump in (("ppo", 0.0), ("rto", 0.5)):
        (logs / run).mkdir(parents=True)
        rows = [{"step": s, "objective/scores": s * 0.1 + bump, "objective/kl": 0.05 * s} for s in range(1, 6)]
        (logs / run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out, report = tmp_path / "out", tmp_path / "REPORT.md"
    proc = subprocess.run([sys.executable, "-m", "paper_figures", "--quick", "--out", str(out), "--report", str(report),
                           "--llm-logs", str(logs)], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stem in EXPECTED:
        for ext in ("png", "pdf"):
            f = out / "figures" / f"{stem}.{ext}"
            assert f.exists() and f.stat().st_size > 1000, f
    text = report.read_text()
    n_checks = 0
    for summary in out.glob("*/summary.json"):
        s = json.loads(summary.read_text())
        for cid in s["checks"]:
            n_checks += 1
            assert f"| {s['experiment']} (quick) | {cid} |" in text, (s["experiment"], cid)
    assert n_checks >= 40
    # a second run reuses the finished results instead of recomputing them
    again = subprocess.run([sys.executable, "-m", "paper_figures", "--quick", "--out", str(out), "--report",
                            str(report), "--only", "E0"], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert again.returncode == 0 and "reusing finished results" in again.stdout
