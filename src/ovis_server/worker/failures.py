"""How a job's failure reads to its client, and to the log."""

from __future__ import annotations

from sqlalchemy.exc import SQLAlchemyError

OUT_OF_MEMORY_MESSAGE = (
    "the GPU ran out of memory for this request, also when retried with a lighter "
    "setting; try a smaller image_size"
)


def database_cause(exc: BaseException) -> str:
    """A database error in a few words for the log: the driver's, without SQL text."""
    return str(getattr(exc, "orig", None) or type(exc).__name__)


class InvalidJobError(ValueError):
    """A stored job whose input the model cannot take."""


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(error type, message) for a job the model could not run, as clients will read it."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is this class
        return "out_of_memory", OUT_OF_MEMORY_MESSAGE
    if isinstance(exc, InvalidJobError):
        return "invalid_input", str(exc)
    if isinstance(exc, SQLAlchemyError):
        # Its text holds SQL, parameters and worker ids: none of that reaches a client.
        return "internal_error", "the server could not record this job's progress; retry"
    return "generation_error", f"{type(exc).__name__}: {exc}"
