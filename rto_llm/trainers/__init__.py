"""Stage trainers (SFT, reward model, DPO) on one shared loop (:mod:`rto_llm.trainers.base`)."""
