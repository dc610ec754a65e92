"""``python -m rto_llm.quickstart --out runs/quickstart`` (``make quickstart``): the whole RTO pipeline on a token
task whose truth is known exactly, in a few minutes on 2 CPU cores.

    1. export   examples/quickstart/task.yaml: a token task (rto_sim.token_task), its tokenizer, a tiny random
                Llama, SFT rows sampled from the task's reference policy (rto_llm.token_task.export_task)
    2. sft      rto-llm sft --config examples/quickstart/sft.yaml
    3. pairs    preference pairs sampled from the SFT model, Bradley-Terry labels on the gold reward
    4. rm       rto-llm rm  --config examples/quickstart/rm.yaml
    5. dpo      rto-llm dpo --config examples/quickstart/dpo.yaml
    6. ppo      rto-llm ppo --config examples/quickstart/ppo.yaml   (exact evaluation every 4 rollouts)
    7. rto      rto-llm rto --config examples/quickstart/rto.yaml
    8. exact    SubOpt, J, E R and KL of the SFT, PPO and RTO policies against the gold reward
                (rto_llm.exact_eval.evaluate_policy), the curves plotted to OUT/quickstart.png

The stages read the shipped YAML files; the quickstart only adds the paths below ``--out`` (and ``--tiny``'s
smaller sizes, used by the test) as ``key=value`` overrides, exactly like extra arguments on the command line.
Every stage runs in this process through the same code as ``rto-llm <stage>``. Prints where everything went and
the final exact numbers; writes OUT/quickstart.json with them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

DEFAULT_CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "quickstart"
STAGE_FILES = ("sft", "rm", "dpo", "ppo", "rto")

# --tiny: sizes for the test (seconds, not minutes); same pipeline
TINY = {"export": {"n_sft": 256, "n_rl_prompts": 64}, "preferences": {"n_pairs": 64},
        "sft": ["train.epochs=1", "train.batch_size=32", "train.micro_batch_size=32"],
        "rm": ["train.max_steps=4", "train.batch_size=16", "train.micro_batch_size=16"],
        "dpo": ["train.max_steps=4", "train.batch_size=16", "train.micro_batch_size=16"],
        "ppo": ["ppo.max_rollouts=2", "eval.every=1", "rollout.batch_size=16", "rollout.generation_batch_size=16",
                "rollout.forward_batch_size=16", "train.batch_size=16", "train.micro_batch_size=16"]}
TINY["rto"] = TINY["ppo"]


def _read_yaml(path: Path) -> dict:
    from rto_llm.config import read_yaml

    return read_yaml(str(path))


def _plot(curves: dict, sft: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, color in (("ppo", "k"), ("rto", "tab:red")):
        rows = curves.get(name, [])
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["eval/gold_subopt"] for r in rows], "o-", color=color, label=name.upper(), ms=3)
        axes[1].plot([r["eval/gold_kl"] for r in rows], [r["eval/gold_return"] for r in rows], "o-", color=color,
                     label=name.upper(), ms=3)
    axes[0].axhline(sft["sub_opt"], color="0.5", ls=":", label="SFT")
    axes[0].set(xlabel="rollout", ylabel="exact SubOpt (gold reward, beta)", title="learning curves")
    axes[1].set(xlabel="KL(pi || pi_ref), exact", ylabel="gold return E_pi R", title="gold reward vs KL")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "quickstart.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(out: str | os.PathLike, configs: str | os.PathLike = DEFAULT_CONFIGS, tiny: bool = False,
        verbose: bool = True, sizes: dict | None = None) -> dict:
    """Run the quickstart into `out` (module docstring); returns the summary written to OUT/quickstart.json.

    `sizes` (default: none; `tiny` uses TINY) changes the shipped settings, in TINY's layout: for "task",
    "export" and "preferences" a mapping merged into task.yaml's section, for a stage name a list of
    ``key=value`` overrides (benchmarks/gpu_check.py runs a GPU-sized task this way)."""
    sizes = TINY if tiny and sizes is None else (sizes or {})
    import torch

    from rto_llm.exact_eval import evaluate_policy
    from rto_llm.experiments.pipeline import quiet, run_stage, stage_overrides
    from rto_llm.token_task import export_task, sample_preferences
    from rto_sim.token_task import make_token_task

    t_start = time.perf_counter()
    out, configs = Path(out).resolve(), Path(configs)
    missing = [f for f in ("task", *STAGE_FILES) if not (configs / f"{f}.yaml").is_file()]
    if missing:
        raise ValueError(f"--configs {configs}: missing {', '.join(f + '.yaml' for f in missing)}; pass the folder "
                         "holding the quickstart configs (examples/quickstart in the repository)")
    spec = _read_yaml(configs / "task.yaml")
    for key in ("task", "export", "preferences"):
        if not isinstance(spec.get(key), dict):
            raise ValueError(f"{configs / 'task.yaml'}: needs a mapping '{key}:' (see the shipped file)")
        spec[key] = {**spec[key], **sizes.get(key, {})}
    out.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    times: dict[str, float] = {}
    torch.set_num_threads(1)          # tiny models: one thread is fastest (and kind to a shared machine)
    # ERROR: the stages' red flags (e.g. "responses hit max_new_tokens", a valid task response here) stay quiet
    with quiet(logging.ERROR):
        t0 = time.perf_counter()
        task = make_token_task(**spec["task"])
        ex = export_task(task, str(out / "task"), overwrite=True, **spec["export"])
        times["export"] = time.perf_counter() - t0
        say(f"[1/8] task exported to {ex.root} (A={task.A}, H={task.H}, {task.n_prompts} prompts, "
            f"{task.num_responses} responses per prompt)")
        common = stage_overrides(task)
        paths = {"task": ex.root, "sft": str(out / "sft"), "rm": str(out / "rm"), "dpo": str(out / "dpo"),
                 "ppo": str(out / "ppo"), "rto": str(out / "rto"), "prefs": str(out / "prefs.jsonl")}
        sft_final = f"{paths['sft']}/final"

        def stage(name: str, over: list[str], step: str, hook=None):
            t0 = time.perf_counter()
            extra = list(sizes.get(name, []))
            tr, hist = run_stage("rto" if name == "rto" else name, [*over, *common, *extra],
                                 config=str(configs / f"{name}.yaml"), hook=hook)
            times[name] = time.perf_counter() - t0
            say(f"{step} {name}: {times[name]:.1f}s -> {paths[name]}")
            return tr, hist

        stage("sft", [f"model.path={ex.model_dir}", f"data.train_path={ex.sft}", f"train.output_dir={paths['sft']}"],
              "[2/8]")
        t0 = time.perf_counter()
        prefs = sample_preferences(sft_final, task, out_path=paths["prefs"], **spec["preferences"])
        times["pairs"] = time.perf_counter() - t0
        say(f"[3/8] {prefs.stats.n_pairs} preference pairs -> {paths['prefs']} (chosen R - rejected R = "
            f"{prefs.stats.mean_chosen_return - prefs.stats.mean_rejected_return:.3f})")
        pref = [f"model.path={sft_final}", f"data.train_path={paths['prefs']}"]
        stage("rm", [*pref, f"train.output_dir={paths['rm']}"], "[4/8]")
        stage("dpo", [*pref, f"train.output_dir={paths['dpo']}"], "[5/8]")
        rl = [f"model.path={sft_final}", f"data.train_path={ex.prompts}", f"data.eval_path={ex.eval_prompts}",
              f"reward.path={paths['rm']}/final", f"eval.gold=task:{ex.root}", f"rollout.max_new_tokens={task.H}"]
        ppo, _ = stage("ppo", [*rl, f"train.output_dir={paths['ppo']}"], "[6/8]")
        rto, rto_hist = stage("rto", [*rl, f"train.output_dir={paths['rto']}", f"rto.dpo_path={paths['dpo']}/final"],
                              "[7/8]")
        t0 = time.perf_counter()
        beta = ppo.cfg.kl.beta2
        res = {"sft": evaluate_policy(sft_final, sft_final, task, beta),
               "ppo": evaluate_policy(f"{paths['ppo']}/final", sft_final, task, beta),
               "rto": evaluate_policy(f"{paths['rto']}/final", sft_final, task, beta)}
        times["exact"] = time.perf_counter() - t0
    curves = {"ppo": ppo.eval_history, "rto": rto.eval_history}
    png = _plot(curves, res["sft"].summary(), out)
    share = [r["rto/share_dpo"] for r in rto_hist if "rto/share_dpo" in r]
    summary = {"out": str(out), "beta": beta, "J_star": res["sft"].J_star, "wall_s": time.perf_counter() - t_start,
               "stage_s": times, "rto_share_dpo": sum(share) / len(share) if share else None,
               "policies": {k: {m: getattr(v, m) for m in ("sub_opt", "J", "expected_return", "kl", "win_rate",
                                                            "valid_mass", "method")} for k, v in res.items()},
               "curves": {k: [{"step": r["step"], "sub_opt": r["eval/gold_subopt"],
                               "gold_return": r["eval/gold_return"], "kl": r["eval/gold_kl"]} for r in v]
                          for k, v in curves.items()},
               "files": {**paths, "plot": str(png), "summary": str(out / "quickstart.json")}}
    (out / "quickstart.json").write_text(json.dumps(summary, indent=1))
    say(f"[8/8] exact evaluation at beta = {beta:g} against the gold reward (J* = {res['sft'].J_star:.4f}):")
    say(f"      {'policy':<6} {'SubOpt':>8} {'J':>8} {'E R':>8} {'KL':>7} {'win vs SFT':>10}")
    for k, v in res.items():
        say(f"      {k.upper():<6} {v.sub_opt:8.4f} {v.J:8.4f} {v.expected_return:8.4f} {v.kl:7.3f} {v.win_rate:10.3f}")
    if summary["rto_share_dpo"] is not None:
        say(f"      RTO: the DPO token reward was {summary['rto_share_dpo']:.0%} of the return's magnitude "
            "(rto/share_dpo)")
    say(f"plot: {png}\nnumbers: {out / 'quickstart.json'}\nmetrics: {paths['ppo']}/metrics.jsonl, "
        f"{paths['rto']}/metrics.jsonl (python -m paper_figures --only llm --llm-logs {out})\n"
        f"done in {summary['wall_s']:.0f}s")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rto_llm.quickstart", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    ap.add_argument("--configs", default=str(DEFAULT_CONFIGS),
                    help="folder of task.yaml and the stage configs (default examples/quickstart)")
    ap.add_argument("--tiny", action="store_true", help="much smaller data and budgets (for tests; seconds)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run(args.out, args.configs, tiny=args.tiny)
    except ValueError as e:
        print(f"rto_llm.quickstart: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
