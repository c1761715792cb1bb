"""How a job's failure reads to its client, and to the log."""

from __future__ import annotations

import logging

from sqlalchemy.exc import SQLAlchemyError

from ovis_server.db.retry import is_transient
from ovis_server.engine.loras import LoraError

logger = logging.getLogger(__name__)

OUT_OF_MEMORY_MESSAGE = (
    "the GPU ran out of memory for this request, also when retried with a lighter "
    "setting; try a smaller image_size"
)


def database_cause(exc: BaseException) -> str:
    """A database error in a few words for the log: the driver's, without SQL text."""
    return str(getattr(exc, "orig", None) or type(exc).__name__)


class DatabasePauses:
    """Growing pauses while the database is out: from ``first`` seconds, doubling up to
    ``most``, back to ``first`` after a success (``reset``)."""

    def __init__(self, first: float, most: float) -> None:
        self.first = self.next = first
        self.most = most

    def after(self, exc: SQLAlchemyError, what: str) -> float:
        """The pause to take after ``exc`` (logged as ``what``); re-raises it unless the
        error is transient."""
        if not is_transient(exc):
            raise exc
        pause, self.next = self.next, min(self.next * 2, self.most)
        logger.warning("%s (%s); trying again in %.1fs", what, database_cause(exc), pause)
        return pause

    def reset(self) -> None:
        self.next = self.first


class InvalidJobError(ValueError):
    """A stored job whose input the model cannot take."""


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(error type, message) for a job the model could not run, as clients will read it."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is this class
        return "out_of_memory", OUT_OF_MEMORY_MESSAGE
    if isinstance(exc, InvalidJobError | LoraError):  # LoraError: a LoRA that does not fit
        return "invalid_input", str(exc)
    if isinstance(exc, SQLAlchemyError):
        # Its text holds SQL, parameters and worker ids: none of that reaches a client.
        return "internal_error", "the server could not record this job's progress; retry"
    return "generation_error", f"{type(exc).__name__}: {exc}"
