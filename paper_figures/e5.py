"""E5 figure: overoptimization, gold reward vs sqrt(KL) for best-of-n and the Gibbs family on fitted
proxies (token MLE, bandit MLE, DPO implicit reward) at several N, and bootstrap ensembles."""

from __future__ import annotations

from pathlib import Path

from rto_sim.results import read_table

from .style import plt, run_info, save


def _curve(ax, d, **kw):
    """Mean over seeds of gold and sqrt_kl at each sweep step."""
    w = d.pivot_table(index=["seed", "step"], columns="metric", values="value").reset_index()
    m = w.groupby("step")[["sqrt_kl", "gold"]].mean()
    ax.plot(m.sqrt_kl, m.gold, **kw)


def draw(summary: dict, out: Path) -> list[Path]:
    df = read_table(out / "E5" / "results")
    df = df[df.family.isin(["bon", "gibbs"]) & df.metric.isin(["gold", "sqrt_kl"])]
    proxies = [p for p in ["token_mle", "bandit", "dpo"] if p in set(df.proxy.dropna())]
    Ns = sorted(n for n in df.N.dropna().unique() if n > 0)
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, len(proxies) + 1, figsize=(3.3 * (len(proxies) + 1), 3.2), squeeze=False)
    axes = axes[0]
    for ax, proxy in zip(axes, proxies):
        for family, ls in (("gibbs", "-"), ("bon", "--")):
            ex = df[(df.proxy == "exact") & (df.family == family)]
            _curve(ax, ex, color="k", ls=ls, lw=1, label=f"exact proxy ({family})" if ax is axes[0] else None)
            for i, n in enumerate(Ns):
                d = df[(df.proxy == proxy) & (df.N == n) & (df.family == family) & (df.ensemble == "single")]
                if len(d):
                    _curve(ax, d, color=cmap(i / max(len(Ns) - 1, 1)), ls=ls, lw=1.2,
                           label=f"N={int(n)}" if family == "gibbs" else None)
        ax.set(title=f"proxy: {proxy}", xlabel="sqrt(KL(pi || pi_ref))", ylabel="gold return")
        ax.legend(fontsize=6)
    ax = axes[-1]
    n_mid = Ns[len(Ns) // 2] if Ns else None
    for ens, color in (("single", "tab:gray"), ("worst", "tab:blue"), ("uwo", "tab:orange")):
        d = df[(df.proxy == proxies[0]) & (df.N == n_mid) & (df.family == "gibbs") & (df.ensemble == ens)] \
            if proxies else df.iloc[:0]
        if len(d):
            _curve(ax, d, color=color, label=ens)
    ax.set(title=f"ensembles of 5 ({proxies[0] if proxies else ''}, N={int(n_mid) if n_mid else ''}, Gibbs)",
           xlabel="sqrt(KL)", ylabel="gold return")
    ax.legend(fontsize=6)
    seeds = int(df.seed.nunique())
    cap = (f"E5 overoptimization: solid = Gibbs family pi ~ pi_ref exp(proxy/t) swept in t, dashed = best-of-n "
           f"(exact law); mean over {seeds} seeds; {run_info(summary)}")
    return save(fig, out, "E5_overoptimization", cap)
