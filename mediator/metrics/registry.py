"""Counters, gauges and histograms with labels, rendered in the Prometheus text format.

A ``Registry`` holds families; ``family.labels(...)`` gives a series once, and
the caller keeps it, so recording is an attribute increment (a counter) or a
``bisect`` on a tuple of bucket bounds and one list-item increment (a
histogram): no lock, and no label string or dict built per call. Each series
has one writer at a time: the per-request and trapped-access series are
written only by the thread serving the device's one client, and the colder
counters that several threads may touch take a lock. The renderer (in the
trio thread) takes none: it reads ints, and copies a histogram's buckets in
one C-level ``list()`` and derives ``_count`` from that copy, so the buckets
stay cumulative and ``+Inf`` equals ``_count``; a scrape may be a few
observations behind, and ``_sum`` one observation apart from the buckets.
Series are listed by family name and label values, and every line's
``name{labels}`` prefix is built when the series is created.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any, Generic, TypeVar

# From a config read answered in the daemon (~5-15 µs) to a DMA_MAP pinning
# guest memory or a reset waiting for the device (~0.1-1 s).
LATENCY_BOUNDS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2, 0.1, 1.0)


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    """A sample value as Prometheus (Go) writes it: ``1`` not ``1.0``, ``+Inf``, ``NaN``."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _is_name(name: str, extra: str = "") -> bool:
    return (
        bool(name)
        and not name[0].isdigit()
        and all(c.isascii() and (c.isalnum() or c == "_" or c in extra) for c in name)
    )


def _prefix(name: str, label_text: str) -> str:
    """The start of a sample line, up to and including the space before the value."""
    return f"{name}{{{label_text}}} " if label_text else f"{name} "


class _Series:
    __slots__ = ()

    def _render(self, out: list[str]) -> None:
        raise NotImplementedError


class Counter(_Series):
    __slots__ = ("_line", "value")

    def __init__(self, line: str) -> None:
        self._line = line
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        """Add ``amount`` (never negative: a counter only goes up)."""
        self.value += amount

    def _render(self, out: list[str]) -> None:
        out.append(self._line + str(self.value))


class Gauge(_Series):
    __slots__ = ("_line", "value")

    def __init__(self, line: str) -> None:
        self._line = line
        self.value: float = 0

    def set(self, value: float) -> None:
        self.value = value

    def _render(self, out: list[str]) -> None:
        out.append(self._line + _format_value(self.value))


class Histogram(_Series):
    __slots__ = ("_bounds", "_bucket_lines", "_count_line", "_counts", "_sum_line", "sum")

    def __init__(
        self, bounds: tuple[float, ...], bucket_lines: tuple[str, ...], sum_line: str, count_line: str
    ) -> None:
        self._bounds = bounds
        # Per bucket, not cumulative: one increment per observation. The last
        # one is the overflow (+Inf) bucket.
        self._counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self._bucket_lines = bucket_lines
        self._sum_line = sum_line
        self._count_line = count_line

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le is "<=").
        self._counts[bisect_left(self._bounds, value)] += 1
        self.sum += value

    def add(self, counts: Sequence[int], total: float) -> None:
        """Observations made elsewhere: how many fell in each bucket (the overflow last), and their sum."""
        for bucket, count in enumerate(counts):
            self._counts[bucket] += count
        self.sum += total

    def _render(self, out: list[str]) -> None:
        cumulative = list(accumulate(list(self._counts)))
        out.extend(line + str(count) for line, count in zip(self._bucket_lines, cumulative, strict=True))
        out.append(self._sum_line + _format_value(self.sum))
        out.append(self._count_line + str(cumulative[-1]))


SeriesT = TypeVar("SeriesT", bound=_Series)


class Family(Generic[SeriesT]):
    """A metric name, its help and label names, and its series by label values."""

    def __init__(
        self,
        kind: str,
        name: str,
        help: str,
        label_names: Sequence[str],
        *,
        make: Callable[[str], SeriesT],
        bounds: tuple[float, ...] = (),
    ) -> None:
        if not _is_name(name, ":"):
            raise ValueError(f"bad metric name {name!r}")
        for label in label_names:
            if not _is_name(label) or label.startswith("__") or (kind == "histogram" and label == "le"):
                raise ValueError(f"{name}: bad label name {label!r}")
        self.kind = kind
        self.name = name
        self.help = help
        self.label_names = tuple(label_names)
        self.bounds = bounds
        self._make = make
        self._lock = threading.Lock()
        self._by_values: dict[tuple[str, ...], SeriesT] = {}
        # Sorted by label values and replaced whole on every insert, so the
        # renderer reads one consistent tuple while a writer adds a series.
        self._series: tuple[tuple[tuple[str, ...], SeriesT], ...] = ()

    def labels(self, *values: str) -> SeriesT:
        """The series for these label values (in ``label_names`` order), created on first use."""
        series = self._by_values.get(values)
        if series is not None:
            return series
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {values}")
        with self._lock:
            series = self._by_values.get(values)
            if series is None:
                label_text = ",".join(
                    f'{name}="{_escape_label_value(value)}"'
                    for name, value in zip(self.label_names, values, strict=True)
                )
                series = self._make(label_text)
                self._series = tuple(sorted((*self._series, (values, series)), key=lambda item: item[0]))
                self._by_values[values] = series
        return series

    def remove(self, *values: str) -> None:
        """Forget the series for these label values (a VM that has gone); absent ones are ignored."""
        with self._lock:
            if self._by_values.pop(values, None) is not None:
                self._series = tuple(item for item in self._series if item[0] != values)

    def _signature(self) -> tuple[object, ...]:
        return (self.kind, self.help, self.label_names, self.bounds)

    def _render(self, out: list[str]) -> None:
        series = self._series
        if not series:
            return
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for _, one in series:
            one._render(out)


class Registry:
    def __init__(self) -> None:
        self._families: dict[str, Family[Any]] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Family[Counter]:
        """The counter family ``name``; the one already registered when its definition is the same."""
        return self._register(
            Family("counter", name, help, labels, make=lambda text: Counter(_prefix(name, text)))
        )

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Family[Gauge]:
        return self._register(
            Family("gauge", name, help, labels, make=lambda text: Gauge(_prefix(name, text)))
        )

    def histogram(
        self, name: str, help: str, labels: Sequence[str] = (), bounds: Sequence[float] = LATENCY_BOUNDS
    ) -> Family[Histogram]:
        edges = tuple(float(bound) for bound in bounds)
        if not edges or list(edges) != sorted(set(edges)) or math.isinf(edges[-1]):
            raise ValueError(f"{name}: bucket bounds must be finite, distinct and increasing")
        les = [_format_value(bound) for bound in edges] + ["+Inf"]

        def make(text: str) -> Histogram:
            joined = text + "," if text else ""
            return Histogram(
                edges,
                tuple(f'{name}_bucket{{{joined}le="{le}"}} ' for le in les),
                _prefix(name + "_sum", text),
                _prefix(name + "_count", text),
            )

        return self._register(Family("histogram", name, help, labels, make=make, bounds=edges))

    def _register(self, family: Family[SeriesT]) -> Family[SeriesT]:
        with self._lock:
            known = self._families.get(family.name)
            if known is None:
                self._families[family.name] = family
                return family
        if known._signature() != family._signature():
            raise ValueError(f"metric {family.name} is already registered with another definition")
        return known

    def render(self) -> str:
        """Every family with at least one series, in the text exposition format 0.0.4."""
        out: list[str] = []
        for _, family in sorted(self._families.copy().items()):
            family._render(out)
        out.append("")
        return "\n".join(out) if len(out) > 1 else ""
