"""Rows to dataclasses, in one place: a column per field, of the same name."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Row

from ovis_server.jobs.job import Job, JobEvent, JobState, JobStatus, StoredOutput

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

D = TypeVar("D", bound="DataclassInstance")


def from_row(cls: type[D], row: Row[Any], **convert: Callable[[Any], Any]) -> D:
    """``cls`` from the row's columns named as its fields (extra columns ignored),
    each passed through its converter in ``convert`` if it has one."""
    return from_mapping(cls, row._mapping, **convert)


def from_mapping(cls: type[D], data: Mapping[Any, Any], **convert: Callable[[Any], Any]) -> D:
    """``from_row`` for a row given as a mapping of column names to values."""
    values: dict[str, Any] = {}
    for name in _field_names(cls):
        value = data[name]
        values[name] = convert[name](value) if name in convert else value
    return cls(**values)


@functools.cache
def _field_names(cls: type[DataclassInstance]) -> tuple[str, ...]:
    return tuple(field.name for field in fields(cls))


def job_from_row(row: Row[Any]) -> Job:
    return from_row(
        Job,
        row,
        input=dict,
        status=JobStatus,
        cancel_requested=bool,
        webhook_intermediate=bool,
        outputs=lambda items: tuple(StoredOutput.from_json(item) for item in items or ()),
        warnings=lambda items: tuple(str(item) for item in items or ()),
    )


def state_from_mapping(data: Mapping[Any, Any]) -> JobState:
    return from_mapping(
        JobState,
        data,
        status=JobStatus,
        warnings=lambda items: tuple(str(item) for item in items or ()),
    )


def event_from_row(row: Row[Any]) -> JobEvent:
    return from_row(JobEvent, row, status=JobStatus)
