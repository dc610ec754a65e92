"""One-GPU check of the rollout sampler and the PPO / RTO trainer (issues 13 and 14), in one short run.

    python benchmarks/gpu_check.py                              # CUDA, random ~0.5B Llama, bf16 + SDPA, < 8 min
    python benchmarks/gpu_check.py --size 1b                    # random ~1.1B Llama (TinyLlama shape)
    python benchmarks/gpu_check.py --device cpu --size tiny     # dry run on CPU (a tiny Llama), ~1-2 min

Sections (each prints its figures; a failing section prints its error and the run goes on):

1. environment: torch / transformers / peft / deepspeed versions, GPU, whether transformers has StaticCache.
2. generation: tokens/s of ``experience.sample_responses`` with the dynamic KV cache, with the static cache,
   and with the static cache + CUDA graphs (``torch.compile(mode="reduce-overhead")``, compile time apart),
   and of ``model.generate`` with every sampling option explicit (do_sample=True, top_k=0, top_p=1.0,
   temperature, repetition_penalty=1.0, min_new_tokens=0); with the same seed, the share of rows whose
   tokens agree with the dynamic path (pure sampling: the paths must sample the same distribution; in bf16
   tiny numerical differences may flip a rare draw) and the largest log-prob difference on agreeing rows.
3. one PPO step, one RTO step with a separate (full) DPO model and one with a LoRA-adapter DPO model:
   seconds for generate / score / update, tokens/s, perf/mfu, peak GPU memory (each trainer built alone,
   one untimed warm-up rollout, then one timed rollout); the actor's dtype and attention implementation
   as the sampler sees them (``model.dtype`` and ``model.attn_implementation`` must reach generation).
4. one DeepSpeed ZeRO-2 PPO step (skipped with a note when deepspeed is not importable).
5. PPO vs RTO on a token task at a size only a GPU makes practical (``rto_llm.quickstart`` with TOKEN_TASK_GPU:
   16 task tokens, horizon 24, 8 prompts, a 4-layer Llama of width 256, 48 rollouts of 256 responses): stage
   times and the gold SubOpt / J / KL of SFT, PPO and RTO, evaluated by sampling (16^24 responses per prompt
   cannot be enumerated). On ``--device cpu`` a tiny version of the same pipeline.

Random weights from a config (no download). Works with torch >= 2.3 (uses nothing newer than 2.11) and
any transformers the trainer supports (StaticCache is feature-detected). With ``$OUT`` set, the printed
lines go to ``$OUT/gpu_check.txt`` and the figures to ``$OUT/gpu_check.json``. ``--budget-s`` (default
420) skips the remaining sections, with a note, once the run has used that many seconds.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LINES: list[str] = []
FIGURES: dict = {}
T0 = time.perf_counter()


def say(msg: str = "") -> None:
    print(msg, flush=True)
    LINES.append(msg)


def write_out() -> None:
    out = os.environ.get("OUT")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_check.txt"), "w") as f:
        f.write("\n".join(LINES) + "\n")
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(FIGURES, f, indent=1, default=str)


def llama_config(size: str, vocab: int):
    from transformers import LlamaConfig

    shapes = {
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2),
        # ~0.49 B parameters: hidden 1536, 16 layers, GQA 12 / 4 heads (head dim 128), vocab 32000
        "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
                     num_key_value_heads=4),
        # ~1.1 B parameters (TinyLlama shape)
        "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                   num_key_value_heads=4),
    }
    return LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False, **shapes[size])


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------
# 1. environment
# ---------------------------------------------------------------------------------------------------


def section_env(args) -> None:
    import torch
    import transformers

    say("== 1. environment")
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    for mod in ("peft", "deepspeed"):
        if importlib.util.find_spec(mod) is None:
            env[mod] = "not installed"
        else:
            try:
                env[mod] = __import__(mod).__version__
            except Exception as e:  # noqa: BLE001
                env[mod] = f"import failed: {type(e).__name__}: {e}"
    env["StaticCache"] = hasattr(transformers, "StaticCache")
    env["device"] = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    for k, v in env.items():
        say(f"{k:14s} {v}")
    FIGURES["env"] = env


# ---------------------------------------------------------------------------------------------------
# 2. generation
# ---------------------------------------------------------------------------------------------------


def _prompts(n: int, lo: int, hi: int, vocab_lo: int, vocab_hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_lo, vocab_hi) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _agreement(a, b) -> tuple[float, float]:
    """(share of rows with identical tokens, max |log-prob difference| over those rows)."""
    ta, la = a
    tb, lb = b
    w = min(ta.shape[1], tb.shape[1])
    same = (ta[:, :w] == tb[:, :w]).all(1) & (ta.shape[1] == tb.shape[1])
    gap = float((la[same, :w] - lb[same, :w]).abs().max()) if bool(same.any()) and la.any() else float("nan")
    return float(same.float().mean()), gap


def section_generation(args, device, dtype) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from rto_llm.ppo.experience import KVDecoder, sample_responses

    say(f"== 2. generation (pure sampling, T = {args.temperature:.2f})")
    cfg = llama_config(args.size, args.vocab)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    try:
        cfg._attn_implementation = args.attn
    except Exception:  # noqa: BLE001 -- read-only in some versions: set below through from_config
        pass
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the GPU (fast for 0.5-1B parameters)
        model = LlamaForCausalLM(cfg).to(dtype=dtype).eval()
    n = sum(p.numel() for p in model.parameters())
    attn = getattr(model.config, "_attn_implementation", "?")
    say(f"model: Llama {args.size}, {n / 1e9:.3f} B parameters, {dtype}, attention {attn}, batch "
        f"{args.gen_batch}, prompts {args.prompt_len // 2}-{args.prompt_len} tokens, {args.max_new_tokens} new tokens")
    FIGURES["gen_model"] = {"params": n, "dtype": str(dtype), "attn": attn}
    prompts = _prompts(args.gen_batch, args.prompt_len // 2, args.prompt_len, 3, args.vocab, seed=1)
    pad, eos = 0, 2
    res = {}

    def run(name, **kw):
        torch.manual_seed(123)
        sync(device)
        t = time.perf_counter()
        _, _, resp, lp = sample_responses(model, prompts, pad, eos, args.max_new_tokens, args.temperature, **kw)
        sync(device)
        dt = time.perf_counter() - t
        toks = int((resp != pad).sum())
        return (resp.cpu(), lp.float().cpu()), dt, toks

    static_ok = KVDecoder(model, 1, 8, static=True).static
    say(f"static cache available for this model / transformers: {static_ok}")
    plan = [("dynamic", {}), ("static", {"static_cache": True}), ("static+compile", {"static_cache": True,
                                                                                     "compile": True})]
    for name, kw in plan:
        try:
            if name == "static+compile":
                _, t_first, _ = run(name, **kw)  # compilation + CUDA-graph recording (+ one generation)
                res.setdefault("compile_first_call_s", t_first)
            run(name, **kw)  # warm-up (allocator, cuBLAS, graph replay)
            out, dt, toks = run(name, **kw)
            res[name] = {"s": dt, "tokens": toks, "tokens_per_s": toks / dt, "out": out}
        except Exception as e:  # noqa: BLE001
            say(f"{name}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc()
    try:
        gen_kw = dict(do_sample=True, top_k=0, top_p=1.0, temperature=args.temperature, repetition_penalty=1.0,
                      min_new_tokens=0, max_new_tokens=args.max_new_tokens, num_beams=1, pad_token_id=pad,
                      eos_token_id=eos)
        from rto_llm.data import pad_sequences

        ids, mask = pad_sequences(prompts, pad, left=True)
        ids, mask = ids.to(device), mask.to(device)
        model.generate(input_ids=ids, attention_mask=mask, **{**gen_kw, "max_new_tokens": 4})  # warm-up
        torch.manual_seed(123)
        sync(device)
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **gen_kw)
        sync(device)
        dt = time.perf_counter() - t
        new = out[:, ids.shape[1]:].cpu()
        toks = int((new != pad).sum())
        # same random draws as the sampler (one multinomial per step): tokens comparable, log-probs not returned
        res["model.generate"] = {"s": dt, "tokens": toks, "tokens_per_s": toks / dt,
                                 "out": (new, torch.zeros(new.shape))}
    except Exception as e:  # noqa: BLE001
        say(f"model.generate: FAILED {type(e).__name__}: {e}")
    say(f"{'path':16s} {'seconds':>8s} {'tokens':>7s} {'tokens/s':>9s} {'same rows vs dynamic':>21s} "
        f"{'max |dlogp|':>11s}")
    base = res.get("dynamic", {}).get("out")
    for name in ("dynamic", "static", "static+compile", "model.generate"):
        if name not in res:
            continue
        r = res[name]
        agree = _agreement(r["out"], base) if ("out" in r and base is not None) else (float("nan"), float("nan"))
        r["same_rows_vs_dynamic"], r["max_logp_gap"] = agree
        say(f"{name:16s} {r['s']:8.3f} {r['tokens']:7d} {r['tokens_per_s']:9.0f} {agree[0]:21.3f} {agree[1]:11.2e}")
    if "compile_first_call_s" in res:
        say(f"static+compile first call (compile + record graphs + one generation): "
            f"{res['compile_first_call_s']:.1f} s")
    if device.type != "cuda":
        say("note: on CPU rollout.compile falls back to eager decoding (one log line above): "
            "static+compile = static")
    FIGURES["generation"] = {k: ({kk: vv for kk, vv in v.items() if kk != "out"} if isinstance(v, dict) else v)
                             for k, v in res.items()}
    model = None  # free it before the trainers
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# 3-4. PPO / RTO steps
# ---------------------------------------------------------------------------------------------------


def build_fixture(root: str, args, dtype, device) -> dict:
    """Actor, reward model (scalar head), full DPO model (actor + noise), LoRA adapter, prompts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from rto_llm.models import set_reward_stats
    from rto_llm.testing import build_tiny_tokenizer, save_model_dir, set_adapter_base, write_jsonl

    tok = build_tiny_tokenizer()
    cfg = llama_config(args.size, max(args.vocab, len(tok)))
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU, saved from there
        actor = LlamaForCausalLM(cfg).to(dtype)
        rm_dict = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id")}
        rm = LlamaForSequenceClassification(cfg.__class__(**{**rm_dict, "num_labels": 1})).to(dtype)
    paths = {"actor": save_model_dir(os.path.join(root, "actor"), actor, tok)}
    set_reward_stats(rm, 0.0, 1.0)
    paths["rm"] = save_model_dir(os.path.join(root, "rm"), rm, tok)
    del rm
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    paths["dpo"] = save_model_dir(os.path.join(root, "dpo"), actor, tok)
    del actor
    base = LlamaForCausalLM.from_pretrained(paths["actor"])
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                           init_lora_weights="gaussian"))
    paths["dpo_adapter"] = os.path.join(root, "dpo_adapter")
    lora.save_pretrained(paths["dpo_adapter"])
    set_adapter_base(paths["dpo_adapter"], paths["actor"])
    del base, lora
    rng = random.Random(0)
    words = [str(i) for i in range(10)] + ["count", "up", "from", "the", "next", "numbers"]
    rows = [{"prompt": " ".join(rng.choice(words) for _ in range(args.prompt_len))} for _ in range(4 * args.rollout)]
    paths["prompts"] = write_jsonl(os.path.join(root, "prompts.jsonl"), rows)
    gc.collect()
    return paths


def make_trainer(name: str, paths: dict, args, out_dir: str, extra: list[str] = ()):
    from bench_ppo_llm import trainer_overrides

    from rto_llm.config import load_config
    from rto_llm.ppo.config import PPOConfig, RTOConfig
    from rto_llm.ppo.trainer import PPOTrainer

    cls = PPOConfig if name in ("ppo", "ppo_zero2") else RTOConfig
    over = trainer_overrides(name, paths, args, out_dir, max_rollouts=2) + [f"rollout.temperature={args.temperature}"]
    if args.device == "cuda":
        over.append(f"model.attn_implementation={args.attn}")
    if args.ppo_static_cache:
        over += ["rollout.static_cache=true"] + (["rollout.compile=true"] if args.device == "cuda" else [])
    return PPOTrainer(load_config(cls, None, [*over, *extra]))


def one_step(name: str, paths: dict, args, out_dir: str, extra: list[str] = ()) -> dict:
    import torch

    tr = make_trainer(name, paths, args, out_dir, extra)
    actor = tr.roles.actor
    p = next(actor.parameters())
    seen = {"actor_dtype": str(p.dtype), "actor_attn": getattr(getattr(actor, "config", None), "_attn_implementation",
                                                               "?")}
    tr.rollout_step(0)  # warm-up (allocator, kernels; DeepSpeed's first step)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    row = tr.rollout_step(1)
    keys = ("perf/time_generate", "perf/time_score", "perf/time_train", "perf/step_s", "perf/throughput",
            "perf/mfu", "perf/peak_mem_gb", "val/response_length", "objective/kl")
    out = {**seen, **{k: row[k] for k in keys if k in row}}
    del tr, actor, p
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


def section_steps(args, paths: dict, root: str) -> None:
    say(f"== 3. PPO / RTO steps (rollout {args.rollout} prompts x {args.max_new_tokens} new tokens, "
        f"train batch {args.train_batch}, micro {args.micro})")
    rows = {}
    for name in ("ppo", "rto_full", "rto_adapter"):
        if over_budget(f"PPO step {name}"):
            break
        try:
            rows[name] = one_step(name, paths, args, root)
        except Exception as e:  # noqa: BLE001
            say(f"{name}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc()
    print_steps(rows)
    FIGURES["steps"] = rows


def section_zero2(args, paths: dict, root: str) -> None:
    say("== 4. DeepSpeed ZeRO-2 PPO step (1 process)")
    if importlib.util.find_spec("deepspeed") is None:
        say("skipped: deepspeed is not installed here (pip install deepspeed)")
        FIGURES["zero2"] = "skipped: deepspeed not installed"
        return
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001
        say(f"skipped: deepspeed is not importable ({type(e).__name__}: {e})")
        FIGURES["zero2"] = f"skipped: {e}"
        return
    if over_budget("ZeRO-2 step"):
        return
    extra = ["deepspeed.enabled=true", "deepspeed.zero_stage=2"]
    if args.device == "cuda":
        extra.append("deepspeed.bf16=true")
    try:
        rows = {"ppo_zero2": one_step("ppo_zero2", paths, args, root, extra)}
        print_steps(rows)
        FIGURES["zero2"] = rows
    except Exception as e:  # noqa: BLE001
        say(f"ppo_zero2: FAILED {type(e).__name__}: {e}")
        traceback.print_exc()


def print_steps(rows: dict) -> None:
    say(f"{'config':12s} {'gen s':>7s} {'score s':>7s} {'update s':>8s} {'step s':>7s} {'tokens/s':>9s} "
        f"{'MFU':>6s} {'peak GB':>8s} {'resp len':>8s}  actor as sampled")
    for name, r in rows.items():
        mfu = f"{100 * r['perf/mfu']:5.1f}%" if "perf/mfu" in r else "   n/a"
        say(f"{name:12s} {r['perf/time_generate']:7.3f} {r['perf/time_score']:7.3f} {r['perf/time_train']:8.3f} "
            f"{r['perf/step_s']:7.3f} {r['perf/throughput']:9.0f} {mfu:>6s} {r['perf/peak_mem_gb']:8.2f} "
            f"{r['val/response_length']:8.1f}  {r['actor_dtype']}, {r['actor_attn']}")


def over_budget(what: str) -> bool:
    used = time.perf_counter() - T0
    if used > ARGS.budget_s:
        say(f"skipped {what}: {used:.0f} s used, over --budget-s {ARGS.budget_s:.0f}")
        return True
    return False


ARGS = None


# section 5 sizes: task.yaml sections merged, stage overrides appended (rto_llm.quickstart.run(sizes=...))
_RL_GPU = ["ppo.max_rollouts=48", "rollout.batch_size=256", "rollout.generation_batch_size=256",
           "rollout.forward_batch_size=256", "train.batch_size=128", "train.micro_batch_size=64", "eval.every=8",
           "eval.batch_size=256"]
TOKEN_TASK_GPU = {
    "task": {"A": 16, "H": 24, "n_prompts": 8}, "export": {"n_sft": 16384, "n_rl_prompts": 2048,
                                                          "hidden_size": 256, "num_layers": 4},
    "preferences": {"n_pairs": 4096},
    "sft": ["train.batch_size=256", "train.micro_batch_size=128"],
    "rm": ["train.max_steps=200", "train.batch_size=64", "train.micro_batch_size=64"],
    "dpo": ["train.max_steps=200", "train.batch_size=64", "train.micro_batch_size=64"],
    "ppo": _RL_GPU, "rto": _RL_GPU,
}


def section_token_task(args, root: str) -> None:
    """PPO vs RTO on a token task through the quickstart pipeline (module docstring, section 5)."""
    from rto_llm import quickstart

    say("== 5. PPO vs RTO on a token task")
    sizes = quickstart.TINY
    if args.device == "cuda":
        sizes = {**TOKEN_TASK_GPU, **{k: [*TOKEN_TASK_GPU[k], "train.device=cuda"] for k in quickstart.STAGE_FILES}}
    t = time.perf_counter()
    try:
        res = quickstart.run(os.path.join(root, "token_task"), sizes=sizes, verbose=False)
    except Exception as e:  # noqa: BLE001
        say(f"token task: FAILED {type(e).__name__}: {e}")
        traceback.print_exc()
        return
    pol = res["policies"]
    say(f"pipeline {time.perf_counter() - t:.1f} s; stages (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in res["stage_s"].items()))
    say(f"{'policy':<6} {'SubOpt':>8} {'J':>8} {'KL':>7}  (beta {res['beta']:g}; J* {res['J_star']:.4f})")
    for k, v in pol.items():
        say(f"{k.upper():<6} {v['sub_opt']:8.4f} {v['J']:8.4f} {v['kl']:7.3f}")
    FIGURES["token_task"] = {"stage_s": res["stage_s"], "policies": pol, "J_star": res["J_star"],
                             "rto_share_dpo": res["rto_share_dpo"], "sizes": sizes}


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--size", default=None, choices=["tiny", "0.5b", "1b"], help="default: 0.5b on cuda, tiny on cpu")
    ap.add_argument("--attn", default="sdpa", help="attention implementation on CUDA (model.attn_implementation)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000; 64 for tiny)")
    ap.add_argument("--gen-batch", type=int, default=None, help="prompts in the generation benchmark")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rollout", type=int, default=None, help="prompts per PPO rollout")
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--micro", type=int, default=None)
    ap.add_argument("--forward-batch", type=int, default=None)
    ap.add_argument("--ppo-static-cache", action="store_true", help="PPO steps with rollout.static_cache (+compile)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: generation,steps,zero2,token_task")
    ap.add_argument("--budget-s", type=float, default=420.0)
    args = ap.parse_args()
    ARGS = args
    big = args.device == "cuda"
    defaults = dict(size="0.5b" if big else "tiny", vocab=32000 if big else 64, gen_batch=64 if big else 8,
                    prompt_len=64 if big else 12, max_new_tokens=256 if big else 16, rollout=64 if big else 8,
                    train_batch=32 if big else 8, micro=8 if big else 4, forward_batch=16 if big else 8)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if big else "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if big and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device; use --device cpu --size tiny for the dry run")
    device = torch.device("cuda", 0) if big else torch.device("cpu")
    dtype = torch.bfloat16 if big else torch.float32
    FIGURES["args"] = vars(args)
    skip = set(args.skip.split(",")) - {""}
    try:
        section_env(args)
        if "generation" not in skip:
            section_generation(args, device, dtype)
        if not ({"steps", "zero2"} <= skip) and not over_budget("PPO / RTO steps"):
            with tempfile.TemporaryDirectory() as root:
                t = time.perf_counter()
                paths = build_fixture(root, args, dtype, device)
                say(f"(fixture: actor, RM, DPO model, LoRA adapter written in {time.perf_counter() - t:.1f} s)")
                if "steps" not in skip:
                    section_steps(args, paths, root)
                if "zero2" not in skip:
                    section_zero2(args, paths, root)
        if "token_task" not in skip and not over_budget("the token task"):
            with tempfile.TemporaryDirectory() as root:
                section_token_task(args, root)
    finally:
        say(f"total {time.perf_counter() - T0:.1f} s")
        write_out()


if __name__ == "__main__":
    main()
