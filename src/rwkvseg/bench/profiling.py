"""Reading torch.profiler's events, shared by the profiling scripts (scripts/profile_model.py, profile_train.py)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch.autograd import DeviceType


def device_kernels(events: Iterable[Any]) -> Iterator[Any]:
    """The kernels (and memory copies and fills) on the device's timeline among a profiler's events: no CPU event,
    no async one, and no user annotation (a record_function's span on the device covers its kernels: counting it
    would count them twice, as torch's own table total leaves it out)."""
    for e in events:
        if e.device_type != DeviceType.CPU and not e.is_async and not getattr(e, "is_user_annotation", False):
            yield e
