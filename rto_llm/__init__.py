"""rto_llm: the LLM half of the RTO toolkit (stages SFT, reward model, DPO, PPO and RTO).

Importing this package imports neither transformers nor deepspeed, peft, wandb or datasets; the
stage trainers load them when they run.
"""

__version__ = "0.1.0"
