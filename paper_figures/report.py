"""paper_figures/REPORT.md, generated from the experiment summaries (never written by hand).

Two tables: **identities** (hold by mathematics or by construction; a failure is a bug) and **predictions**
(empirical claims that could come out either way), from each check's `kind`. The "paper's statement" column holds
the paper's own claim where the paper makes it (the check's `paper` field) and "our prediction" (or "our identity")
otherwise: the claim texts below are our short names and summaries, never the paper's words. A verdict of a reduced
grid (`--quick`) is printed "pass (quick grid)" etc. Every number comes from OUT/<experiment>/summary.json."""

from __future__ import annotations

import time
from pathlib import Path

from rto_sim.results import atomic_write_bytes, verdict_label

# check-id prefix -> (claim, our one-line summary of it: docs/theory.md section 2 / section 6)
CLAIMS = {
    "1_": ("Gibbs equivalence", "prod_h pi*(y_h|s_h) = pi_ref(y|x) exp(R/beta)/Z(x), V*(x) = beta log Z(x)"),
    "2_": ("DPO implicit token reward", "beta log pi*/pi_ref = r + V*(s') - V*(s) (RTO Sec. 4, Rafailov et al. 2024)"),
    "3_": ("Telescoping", "sum_h beta log pi*/pi_ref = R(tau) - V*(s_1)"),
    "4_": ("BT invariance", "DPO loss at pi*_beta equals the BT NLL of the true reward"),
    "5_": ("Potential shaping", "shaped rewards (Semi-RTO, DDPO, RS-PPO redistributions) keep pi*_beta"),
    "6_": ("Value under the DPO reward", "J_beta(pi; r*) = -beta KL(pi || pi*_beta)"),
    "7_": ("Implicit reward under pi_ref", "E_pi_ref[beta log pi_theta/pi_ref] = -beta KL(pi_ref||pi_theta) <= 0"),
    "8_": ("KL performance difference (Lemma A.2)",
           "V^pi - V^pi' = E_d^pi[Q^pi' - V^pi' - beta log pi]; gap = beta KL"),
    "9_": ("RTO limits", "beta1=0 is PPO; beta1=beta2, beta3=0 gives pi_dpo; optimum ~ pi_ref^(1-c) pi_dpo^c"),
    "10_": ("beta limits", "beta -> inf gives pi_ref; beta -> 0 gives argmax R"),
    "11_": ("Shaping is a critic offset", "tree, tabular critic: RS-PPO from V = 0 equals PPO from V = prefix DPO sum"),
    "12_": ("Markov beats predetermined (Prop. C.2)", "stochastic transitions: best Markov 1, predetermined 1/2"),
    "13_": ("DPO identity, stochastic transitions", "identity 2 holds in expectation over s' only (exactly if "
                                                     "deterministic)"),
    "S1": ("Token MLE rate", "centred-return RMSE ~ N^(-1/2): log-log slope in [-0.55, -0.45]"),
    "S2": ("Token MLE level", "MSE ~= d_eff / (2 s N)"),
    "S3": ("Token vs bandit at fixed N", "RMSE ratio ~= (K-1)/sqrt(K d_eff)"),
    "S4": ("Bandit error vs H", "bandit error grows like sqrt(A^H); token error flat"),
    "S5": ("Gibbs plug-in gap", "gap = beta KL(pi_hat || pi*), slope in N near -1"),
    "S6": ("Argmax policies", "token learner finds y* unseen; bandit cannot while N << K"),
    "S7": ("Tree-tabular control", "tree-tabular token reward = bandit (no advantage without sharing)"),
    "S8": ("Fisher check", "N (theta_hat - theta*)' I (theta_hat - theta*) ~ chi2(d_eff)"),
    "S9": ("Theorem 4.2, first term", "2 rho E_d*||phi||_{Sigma^-1} does not increase with N"),
    "S10": ("Coverage", "pessimistic SubOpt tracks the feature-coverage term, not per-step counts"),
    "S11": ("Proposition 3.2", "query counts of sentence- and token-level search for argmax pi_e"),
    "S12": ("Shaping ablations (exact)", "RTO, Semi-RTO, DDPO share the optimum; RS-PPO = PPO"),
    "S13": ("Practical RTO", "dense rewards learn faster; RTO needs fewer preference pairs than PPO (Fig. 4)"),
    "S14": ("Overoptimization", "finite-N proxies rise then fall in gold vs sqrt(KL); ensembles flatten"),
    "S15": ("Neural RTO learns faster (E8)", "RTO's reward rises faster than PPO's during training (Fig. 4a/4b)"),
    "S16": ("Horizon (E8)", "dense token rewards help credit assignment more as H grows (our prediction)"),
    "S17": ("Data efficiency (E8)", "RTO with about 1/8 of the preference data matches PPO (Fig. 4c)"),
    "S18": ("Ablations, neural (E8)", "RTO 27.00 > Semi-RTO 23.77 > DDPO 21.09; RS-PPO 27.52 (Table 2)"),
    "S19": ("DPO reward over training (E8)", "the policy's DPO implicit reward rises during RTO (Fig. 6)"),
    "E8_": ("E8 design and identities", "paired arms start equal; SubOpt >= 0; the DPO term is not negligible"),
    "S20": ("Asymptote, dense vs delayed (E7)", "shaped variants reach the same asymptote (identity 5: same optimum)"),
    "S21": ("Speed-up of dense rewards (E7)", "dense DPO token rewards learn faster than delayed ones (RTO section 5)"),
    "S22": ("Advantage SNR (E7)", "dense placement gives advantage estimates closer to the exact advantage (ours)"),
    "S23": ("Data efficiency (E7)", "RTO with about 1/8 of the preference data matches PPO (Fig. 4c)"),
    "S24": ("Sampling temperature (E3)", "policies trained at T = 1, sampled at T: token plug-in best at T = 1 and "
                                       "ahead of the bandit plug-in at every T"),
    "S25": ("Theorem 4.2 / B.1 at a data-only rho", "bounds hold and the event covers w.p. >= 1 - delta, rho without "
                                                     "theta*"),
}


def _claim(check_id: str) -> tuple[str, str]:
    for prefix in sorted(CLAIMS, key=len, reverse=True):
        if check_id.startswith(prefix):
            return CLAIMS[prefix]
    return (check_id, "")


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    if isinstance(x, dict):
        return "; ".join(f"{k}={_fmt(v)}" for k, v in x.items())
    return str(x)


HEADER = ("| experiment | check | claim | paper's statement | our measurement | predicted | tolerance | verdict |",
          "|---|---|---|---|---|---|---|---|")


def _rows(summaries: dict[str, dict], kind: str, counts: dict) -> list[str]:
    lines = []
    for name, s in summaries.items():
        quick = bool(s.get("quick"))
        for cid, c in s["checks"].items():
            if c.get("kind", "prediction") != kind:
                continue
            claim, summary = _claim(cid)
            paper = c.get("paper") or ("our identity" if kind == "identity" else "our prediction")
            note = c.get("note", "")
            cell = _fmt(c["measured"]) + (f" ({note})" if note else "")
            verdict = verdict_label(c, quick)
            row = [f"{name}{' (quick)' if quick else ''}", cid, f"{claim}: {summary}" if summary else claim, paper,
                   cell, _fmt(c["predicted"]), _fmt(c["tolerance"]), f"**{verdict}**"]
            lines.append("| " + " | ".join(x.replace("|", "\\|").replace("\n", " ") for x in row) + " |")
            counts[(kind, verdict)] = counts.get((kind, verdict), 0) + 1
    return lines


def write_report(summaries: dict[str, dict], path: Path, timings: dict[str, float] | None = None) -> Path:
    counts: dict[tuple[str, str], int] = {}
    ident, pred = _rows(summaries, "identity", counts), _rows(summaries, "prediction", counts)
    quick = [name for name, s in summaries.items() if s.get("quick")]
    lines = ["# Claims report", "",
             "Generated by `python -m paper_figures` from `OUT/<experiment>/summary.json`; do not edit by hand.",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "Columns: *claim* is our short name and summary of the claim (docs/theory.md sections 2 and 6); *paper's "
             "statement* is the paper's own claim where the paper makes it, else \"our prediction\" / \"our "
             "identity\"; *our measurement* is the measured value with the note on how it was measured. Verdicts: "
             "pass, fail, or inconclusive (the data cannot decide; the note gives the power it had)."]
    if quick:
        lines += ["", f"**Reduced grids (`--quick`): {', '.join(quick)}.** Their verdicts are labelled \"(quick "
                      "grid)\" and do not confirm or refute the full claims; read a full-grid report."]
    lines += ["", "## Predictions", "",
              "Empirical claims that could come out either way.", "", *HEADER, *pred,
              "", "## Identities", "",
              "Hold by mathematics or by construction: a failure is a bug, a pass confirms the code, not a finding.",
              "", *HEADER, *ident, ""]
    for kind in ("prediction", "identity"):
        got = {v: n for (k, v), n in counts.items() if k == kind}
        lines.append(f"{kind.capitalize()} verdicts: " + (", ".join(f"{v}: {n}" for v, n in sorted(got.items()))
                                                          or "none"))
    lines.append("")
    if timings:
        lines += ["Wall time per experiment (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), ""]
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
