"""PPO and RTO stages of the LLM trainer (RTO: Zhong et al., ICML 2025, "DPO Meets PPO").

- :mod:`rto_llm.ppo.config`: ``PPOConfig`` / ``RTOConfig`` (paper defaults, every field documented).
- :mod:`rto_llm.ppo.roles`: the models of a run (actor, critic, reference, RM, DPO model), loaded and checked.
- :mod:`rto_llm.ppo.experience`: pure-sampling generation and the ``Experience`` record (loop steps 2-6).
- :mod:`rto_llm.ppo.update`: the PPO update, actor and critic micro-steps (loop step 8).
- :mod:`rto_llm.ppo.trainer`: the numbered PPO loop (generate -> score -> rewards -> GAE -> epochs).
- :mod:`rto_llm.ppo.metrics`: rollout / update metrics and console red flags.
- :mod:`rto_llm.ppo.cli`: ``main(argv)`` for the ``ppo`` and ``rto`` stages.

Every equation (rewards, KL, GAE, whitening, losses) comes from :mod:`rto_sim.core`. Importing this
package imports neither transformers nor deepspeed.
"""
