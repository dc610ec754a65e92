"""Statistics shared by the experiments' checks: confidence intervals, log-log slopes, paired differences,
derived seeds, and the text formats of the measured values.

(The torch statistics of the algorithm core, masked means and whitening, are `rto_sim.core.stats`.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


# ---------------------------------------------------------------------- intervals
def t_interval(x) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean of the samples `x` (seeds); nan ends for one sample."""
    x = np.asarray(x, float)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return m, m - h, m + h


def paired_interval(a, b) -> tuple[float, float, float]:
    """`t_interval` of the paired differences a - b (the same seeds on both sides)."""
    return t_interval(np.asarray(a, float) - np.asarray(b, float))


def binomial_slack(p: float, n: int) -> float:
    """Two binomial standard errors of a frequency with success probability p over n trials."""
    return 2.0 * np.sqrt(p * (1 - p) / max(n, 1))


def ci_verdict(low: float, high: float, mean: float) -> str:
    """Verdict of a predicted positive effect from its 95% interval: "pass" if the interval lies above 0, "fail"
    if it lies below 0 or the mean is <= 0, else "inconclusive"."""
    return "pass" if low > 0 else ("fail" if high < 0 or mean <= 0 else "inconclusive")


# ---------------------------------------------------------------------- slopes
def loglog_slope(x, y) -> float:
    """Least-squares slope of log y on log x over the points with y > 0 (nan with fewer than two)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = y > 0
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0]) if ok.sum() >= 2 else float("nan")


def pooled_loglog_slope(df: pd.DataFrame, y: str, group: str = "H", x: str = "N") -> tuple[float, dict]:
    """Slope of log(df[y]) on log(df[x]) with one intercept per `group` value (fixed effects), pooled over
    the groups with at least two x values; and the per-group slopes {group value: slope}."""
    xs, ts, per = [], [], {}
    for g, d in df.groupby(group):
        if d[x].nunique() < 2:
            continue
        lx, ly = np.log(d[x].to_numpy(float)), np.log(d[y].to_numpy(float))
        per[g] = float(np.polyfit(lx, ly, 1)[0])
        xs.append(lx - lx.mean())
        ts.append(ly - ly.mean())
    if not xs:
        return float("nan"), per
    u, t = np.concatenate(xs), np.concatenate(ts)
    return float(u @ t / (u @ u)), per


# ---------------------------------------------------------------------- seeds
def derived_seed(*parts: int) -> int:
    """A 32-bit seed derived from integer parts (experiment part, class, N, seed index, ...) through
    numpy's SeedSequence: distinct parts give independent streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


# ---------------------------------------------------------------------- text
def fmt_interval(ci: tuple[float, float, float]) -> str:
    """"mean [low, high]" with 4 decimals."""
    return f"{ci[0]:.4f} [{ci[1]:.4f}, {ci[2]:.4f}]"


def fmt_values(d: dict) -> str:
    """"key: value, ..." with 3 significant digits."""
    return ", ".join(f"{k}: {v:.3g}" for k, v in d.items())
