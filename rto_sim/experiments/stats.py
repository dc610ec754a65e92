"""Statistics shared by the experiments' checks: confidence intervals, log-log slopes, paired differences,
derived seeds, and the text formats of the measured values.

(The torch statistics of the algorithm core, masked means and whitening, are `rto_sim.core.stats`.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


# ---------------------------------------------------------------------- intervals
def t_interval(x, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval (default 95%) of the mean of the samples `x` (seeds); nan ends for one
    sample."""
    x = np.asarray(x, float)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
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


# ---------------------------------------------------------------------- equivalence, censored times, bootstrap
def tost(diffs, margin: float, alpha: float = 0.05) -> dict:
    """Two one-sided t-tests (TOST) that the mean of the paired differences `diffs` lies within (-margin, margin):
    equivalence at level alpha iff the (1 - 2 alpha) t-interval lies inside the margin. Returns {"mean", "low",
    "high" (that interval), "p" (the larger one-sided p-value), "equivalent", "different" (the two-sided
    (1 - alpha) interval lies entirely outside [-margin, margin]: a difference larger than the margin), "n"}."""
    x = np.asarray(diffs, float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n < 2:
        return {"mean": float(x.mean()) if n else float("nan"), "low": float("nan"), "high": float("nan"),
                "p": float("nan"), "equivalent": False, "different": False, "n": n}
    m, se = float(x.mean()), float(x.std(ddof=1) / np.sqrt(n))
    se = max(se, 1e-300)
    p = max(float(stats.t.sf((m + margin) / se, n - 1)), float(stats.t.sf((margin - m) / se, n - 1)))
    h1 = float(stats.t.ppf(1 - alpha, n - 1) * se)
    h2 = float(stats.t.ppf(1 - alpha / 2, n - 1) * se)
    return {"mean": m, "low": m - h1, "high": m + h1, "p": p, "equivalent": bool(-margin < m - h1 and m + h1 < margin),
            "different": bool(m - h2 > margin or m + h2 < -margin), "n": n}


def crossing_time(x, y, level: float) -> float:
    """The first x at which the piecewise-linear curve (x, y) reaches `level` (linear interpolation between the
    two points around the first crossing); nan if it never does (a censored time)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    hit = np.flatnonzero(y >= level)
    if not len(hit):
        return float("nan")
    i = int(hit[0])
    if i == 0 or y[i] == y[i - 1]:
        return float(x[i])
    return float(x[i - 1] + (level - y[i - 1]) * (x[i] - x[i - 1]) / (y[i] - y[i - 1]))


def restricted_mean(times, budget: float) -> float:
    """Restricted mean time to the event, E[min(T, budget)], with nan = not reached by `budget` (censored there).
    With administrative censoring only (every run has the same budget) this is the area under the Kaplan-Meier
    survival curve up to the budget."""
    t = np.asarray(times, float)
    return float(np.where(np.isfinite(t), np.minimum(t, budget), budget).mean())


def km_median(times) -> float:
    """Median time to the event from the Kaplan-Meier curve under administrative censoring (nan = censored at a
    common budget): the smallest observed time by which at least half of the runs had the event; inf if fewer
    than half ever did."""
    t = np.sort(np.asarray(times, float))
    n = len(t)
    k = int(np.ceil(n / 2))
    if n == 0 or not np.isfinite(t[k - 1]):
        return float("inf")
    return float(t[k - 1])


def bootstrap(stat, n: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """stat(idx) on `n_boot` resamples with replacement of the indices 0..n-1 (seeds: resampling whole seeds
    keeps every pairing within a seed)."""
    rng = np.random.default_rng(seed)
    return np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)], float)


def percentile_interval(samples, level: float = 0.95) -> tuple[float, float]:
    """(low, high) percentile interval of bootstrap samples (nan entries dropped)."""
    s = np.asarray(samples, float)
    s = s[~np.isnan(s)]
    if not len(s):
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(s, a)), float(np.quantile(s, 1 - a))


# ---------------------------------------------------------------------- verdicts that can fail (rates, coverage, power)
def band_verdict(low: float, high: float, band_low: float, band_high: float) -> str:
    """Verdict of "the quantity lies in [band_low, band_high]" from one interval [low, high]: "pass" if the
    interval lies inside the band, "fail" if it lies entirely outside, else "inconclusive"; nan ends give
    "inconclusive"."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    if band_low <= low and high <= band_high:
        return "pass"
    if high < band_low or low > band_high:
        return "fail"
    return "inconclusive"


def band_test(est: float, se: float, band: tuple[float, float], alpha: float = 0.05, df: int | None = None) -> dict:
    """Equivalence-style test of "the quantity lies in band" from an estimate and its standard error (t with `df`
    degrees of freedom, else normal): "pass" if the (1 - 2 alpha) interval lies inside the band (two one-sided tests
    at level alpha, TOST), "fail" if the (1 - alpha) interval lies entirely outside it, else "inconclusive".
    Returns {"est", "se", "low", "high" (the (1 - alpha) interval), "verdict", "mde" (`min_detectable_effect`)}."""
    if not (np.isfinite(est) and np.isfinite(se)):
        return {"est": est, "se": se, "low": float("nan"), "high": float("nan"), "verdict": "inconclusive",
                "mde": float("nan")}
    dist = stats.t(df) if df else stats.norm
    q1, q2 = float(dist.ppf(1 - alpha)), float(dist.ppf(1 - alpha / 2))
    if band[0] <= est - q1 * se and est + q1 * se <= band[1]:
        v = "pass"
    elif est + q2 * se < band[0] or est - q2 * se > band[1]:
        v = "fail"
    else:
        v = "inconclusive"
    return {"est": float(est), "se": float(se), "low": float(est - q2 * se), "high": float(est + q2 * se),
            "verdict": v, "mde": min_detectable_effect(se, alpha)}


def mean_band_test(samples, band: tuple[float, float], alpha: float = 0.05) -> dict:
    """`band_test` of the mean of independent samples (t with n - 1 degrees of freedom)."""
    x = np.asarray(samples, float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return band_test(float(x.mean()) if len(x) else float("nan"), float("nan"), band, alpha)
    return {**band_test(float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))), band, alpha, df=len(x) - 1),
            "n": len(x)}


def log_mean_se(samples) -> tuple[float, float]:
    """(log of the mean, its delta-method standard error sd / (sqrt(n) mean)) of positive samples (seeds)."""
    x = np.asarray(samples, float)
    m = float(x.mean())
    if len(x) < 2 or m <= 0:
        return (float(np.log(m)) if m > 0 else float("nan")), float("nan")
    return float(np.log(m)), float(x.std(ddof=1) / (np.sqrt(len(x)) * m))


def weighted_slope(x, y, se) -> tuple[float, float]:
    """(slope, its standard error): least-squares slope of y on x with independent per-point standard errors `se`
    (e.g. `log_mean_se` of seed samples); se_slope = sqrt(sum (x - xbar)^2 se^2) / sum (x - xbar)^2. Only the
    sampling noise of the points enters: a curve that is not a straight line shows up as a slope away from the
    prediction, not as a wider interval. (nan, nan) with fewer than two usable points."""
    x, y, se = (np.asarray(v, float) for v in (x, y, se))
    ok = np.isfinite(y) & np.isfinite(se)
    x, y, se = x[ok], y[ok], se[ok]
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan"), float("nan")
    u = x - x.mean()
    return float(u @ (y - y.mean()) / (u @ u)), float(np.sqrt((u**2 * se**2).sum()) / (u @ u))


def pooled_slope(groups: dict) -> tuple[tuple[float, float], dict]:
    """Fixed-effects slope over strata, groups = {key: (x, y, se)}: one intercept per stratum and a common slope
    sum u t / sum u^2 (u, t centred within each stratum), with its standard error as in `weighted_slope`; and each
    stratum's own (slope, se). Returns ((slope, se), {key: (slope, se)})."""
    num = den = var = 0.0
    per = {}
    for k, (x, y, se) in groups.items():
        x, y, se = (np.asarray(v, float) for v in (x, y, se))
        ok = np.isfinite(y) & np.isfinite(se)
        x, y, se = x[ok], y[ok], se[ok]
        if len(x) < 2 or np.ptp(x) == 0:
            continue
        u = x - x.mean()
        num += float(u @ (y - y.mean()))
        den += float(u @ u)
        var += float((u**2 * se**2).sum())
        per[k] = weighted_slope(x, y, se)
    if den == 0:
        return (float("nan"), float("nan")), per
    return (num / den, float(np.sqrt(var)) / den), per


def rate_test(pooled: tuple[float, float], per: dict, band: tuple[float, float], alpha: float = 0.05) -> dict:
    """Verdict of a rate claim "the slope lies in band" from `pooled_slope`'s output. The pooled slope gets
    `band_test`; every stratum's slope is tested for contradicting the band with a Bonferroni (1 - alpha / m)
    interval (m strata). "fail" if the pooled slope or any stratum contradicts the band, "pass" if the pooled test
    passes and no stratum contradicts it, else "inconclusive". Returns the pooled `band_test` dict with the
    verdict replaced, plus "outside" (the strata whose interval lies entirely outside the band) and "strata"
    ({key: (slope, low, high)} at the Bonferroni level)."""
    res = band_test(*pooled, band, alpha)
    m = max(len(per), 1)
    z = float(stats.norm.ppf(1 - alpha / (2 * m)))
    strata = {k: (b, b - z * s, b + z * s) for k, (b, s) in per.items()}
    outside = [k for k, (_, lo, hi) in strata.items() if band_verdict(lo, hi, *band) == "fail"]
    verdict = "fail" if (res["verdict"] == "fail" or outside) else res["verdict"]
    return {**res, "verdict": verdict, "outside": outside, "strata": strata}


def binomial_margin(p: float, n: int, alpha: float = 0.05) -> float:
    """One-sided normal margin z_{1-alpha} sqrt(p (1 - p) / n) of a frequency with success probability p."""
    return float(stats.norm.ppf(1 - alpha) * np.sqrt(p * (1 - p) / max(n, 1)))


def coverage_test(successes: int, n: int, target: float, alpha: float = 0.05) -> dict:
    """Test of "P(event) >= target" from `successes` out of `n` independent trials: the exact one-sided binomial
    p-value of H0 P >= target; verdict "fail" if p < alpha (coverage significantly below the target, i.e. below
    target minus its binomial margin), else "pass"; "inconclusive" without trials. Returns {"rate", "n",
    "margin" (`binomial_margin`), "p", "verdict"}."""
    if n <= 0:
        return {"rate": float("nan"), "n": 0, "margin": float("nan"), "p": float("nan"), "verdict": "inconclusive"}
    p = float(stats.binomtest(int(successes), int(n), target, alternative="less").pvalue)
    return {"rate": successes / n, "n": int(n), "margin": binomial_margin(target, n, alpha), "p": p,
            "verdict": "fail" if p < alpha else "pass"}


def min_detectable_effect(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true effect a two-sided level-alpha test with standard error `se` detects with probability
    `power`: (z_{1-alpha/2} + z_power) se (2.8 se at the defaults)."""
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se)
