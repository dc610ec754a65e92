"""rto_llm: the LLM half of the RTO toolkit (stages SFT, reward model, DPO, PPO and RTO).

Importing this package imports neither transformers nor deepspeed, peft, wandb or datasets; the
stage trainers load them when they run.

DeepSpeed logs "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
it." whenever it is imported on a machine without an accelerator, which every CPU run does (directly,
or through transformers / accelerate when a model is saved). Importing this package attaches a filter to
DeepSpeed's logger that drops that one record; every other DeepSpeed message still shows.
"""

import logging as _logging

__version__ = "0.1.0"

DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


class _DropDeepSpeedCpuNotice(_logging.Filter):
    """Drops only DeepSpeed's "Setting accelerator to CPU ..." record."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DEEPSPEED_CPU_NOTICE)


def quiet_deepspeed_cpu_notice() -> None:
    """Attach the filter to DeepSpeed's logger (``deepspeed.utils.logger``, named "DeepSpeed"), once."""
    ds_logger = _logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropDeepSpeedCpuNotice) for f in ds_logger.filters):
        ds_logger.addFilter(_DropDeepSpeedCpuNotice())


quiet_deepspeed_cpu_notice()
