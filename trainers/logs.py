"""What a run prints, and from which process: called first thing in train.py.

The main process (global rank 0) prints tunelab's log lines and every warning that may matter. The other ranks
run the same code on the same data, so they print errors only: a line from them would repeat rank 0's. Library
loggers are kept at warnings, their progress bars off (tunelab logs a line for each of those passes: the data
counts, each export). A few library warnings that are harmless in a tunelab run are dropped at their source, each
by its exact message, with the reason beside it; any other warning still shows.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

LIBRARIES = ("transformers", "datasets", "accelerate", "peft", "torch", "DeepSpeed", "deepspeed", "py.warnings")


def is_main_process() -> bool:
    """Global rank 0, read from the launcher's environment (before any process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message matches ``pattern`` and, if given, satisfies ``when``."""

    def __init__(self, pattern: str, when=lambda message: True):
        super().__init__()
        self.pattern, self.when = re.compile(pattern), when

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (self.pattern.search(message) and self.when(message))


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _only_tied_heads(message: str) -> bool:
    names = re.findall(r"'([^']+)'", message)
    return bool(names) and all(name.endswith("lm_head.weight") for name in names)


def _no_cuda_device(_message: str) -> bool:
    import torch

    return not torch.cuda.is_available()


def _drop_harmless_warnings() -> None:
    # accelerate's checkpoint save (accelerate.utils.other.clean_state_dict_for_safetensors) stores a tensor shared
    # by two names once. With tied embeddings the second name is the LM head, which the model ties back to the
    # input embedding when the checkpoint is loaded into it; any other shared name still warns.
    logging.getLogger("accelerate.utils.other").addFilter(_DropMessage(r"Removed shared tensor \{", _only_tied_heads))
    # Importing DeepSpeed (transformers and accelerate do it to check for ZeRO) on a machine without CUDA: the CPU
    # is the right choice there. On a machine with a GPU the same message means detection failed, and it shows.
    logging.getLogger("DeepSpeed").addFilter(_DropMessage(r"^Setting accelerator to CPU\.", _no_cuda_device))
    # peft's PeftModel reads the model's `is_gradient_checkpointing` property, which transformers 5 renamed
    # (`is_activation_checkpointing`); the value read is the same, only the name is deprecated.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def setup_logging(main: bool | None = None) -> None:
    """Log levels, filters and progress bars for this process (``main``: default from the launcher's RANK)."""
    import datasets
    import transformers

    main = is_main_process() if main is None else main
    logging.captureWarnings(True)  # warnings go through the "py.warnings" logger, so that ranks can silence them
    _drop_harmless_warnings()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    if main:
        logging.getLogger("tunelab").setLevel(logging.INFO)
        for name in LIBRARIES:
            logging.getLogger(name).setLevel(logging.WARNING)
        return
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("tunelab", *LIBRARIES):
        # a filter, not only a level: DeepSpeed's import resets its logger's level to WARNING
        logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger(name).addFilter(_ErrorsOnly())
