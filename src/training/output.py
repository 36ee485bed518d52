"""Lightning's console output without the noise: the progress bars and the useful lines stay.

Dropped: the `GPU available / TPU available` lines (train states its device choices itself), the litlogger
advert, the `Total Flops 0` line and FLOPs column of the model summary (Lightning counts no FLOPs for a model
it has not traced) and `v_num` in the progress bar (the run folder is printed once, at the start).
"""

import logging
from typing import Any

from pytorch_lightning.callbacks import ModelSummary, TQDMProgressBar
from pytorch_lightning.utilities.model_summary.model_summary import _format_summary_table

# start of the info lines Lightning logs through rank_zero_info that tell a user nothing
NOISE = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:", "Trainer already configured with model summary")
RANK_ZERO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")
log = logging.getLogger(ModelSummary.__module__)  # Lightning's logger, shown at INFO like its own summary


class DropNoise(logging.Filter):
    """Drops log records whose message starts with one of NOISE."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOISE)


def quiet_lightning() -> None:
    """Filter Lightning's noise lines from its rank-zero loggers (once per process; repeated calls add nothing)."""
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise())


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar without the logger version (`v_num`)."""

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class QuietModelSummary(ModelSummary):
    """Lightning's model summary table without the FLOPs column and the `Total Flops` line."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        lines = [line for line in table.splitlines() if not line.rstrip().endswith("Total Flops")]
        log.info("\n" + "\n".join(lines))


def quiet_callbacks() -> list:
    """The progress bar and model summary callbacks to give the Trainer (they replace Lightning's defaults)."""
    return [ProgressBar(), QuietModelSummary()]
