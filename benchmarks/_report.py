"""Result tables: per-round samples in, medians and ratios to the floor out (text or JSON)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks._stats import median

_MAX_STATUS = 90


@dataclass(frozen=True)
class Column:
    """A metric shown as the median over rounds (or the worst round, for losses).

    ``spread``: also show the lowest and highest round, as a ``range`` column.
    """

    key: str
    header: str
    digits: int = 1
    worst: bool = False
    spread: bool = False


@dataclass(frozen=True)
class Ratio:
    """``× floor``: how many times slower than the floor system (1.00 = the floor)."""

    key: str
    header: str = "× floor"
    higher_is_better: bool = False


class Table:
    """One scenario's results: rows are systems, optionally split into groups (K, size)."""

    def __init__(
        self,
        name: str,
        title: str,
        columns: Sequence[Column],
        *,
        details: Sequence[str] = (),
        notes: Sequence[str] = (),
        floor: str | None = None,
        ratio: Ratio | None = None,
        groups: Sequence[str] = ("",),
        group_header: str = "",
    ) -> None:
        self.name = name
        self.title = title
        self.columns = list(columns)
        self.details = list(details)
        self.notes = list(notes)
        self.floor = floor
        self.ratio = ratio
        self.groups = list(groups)
        self.group_header = group_header
        self._systems: list[str] = []
        self._samples: dict[tuple[str, str], dict[str, list[float]]] = {}
        self._status: dict[str, str] = {}
        self._errors: dict[tuple[str | None, str], list[str]] = {}

    def ensure(self, system: str) -> None:
        """Give ``system`` a row (in first-seen order) even if it never produces data."""
        if system not in self._systems:
            self._systems.append(system)

    def set_status(self, system: str, status: str) -> None:
        """Mark a system as not installed / not available for the rest of the run."""
        self.ensure(system)
        self._status[system] = status

    def status(self, system: str) -> str | None:
        return self._status.get(system)

    def add_error(self, system: str, error: str, group: str | None = None) -> None:
        """Record a failed round: of the whole system (``group`` None) or of one group."""
        self.ensure(system)
        self._errors.setdefault((group, system), []).append(error)

    def errors(self, group: str, system: str) -> list[str]:
        """Failures that concern this cell: its group's, then the whole system's."""
        return [*self._errors.get((group, system), []), *self._errors.get((None, system), [])]

    def add(self, group: str, system: str, metrics: Mapping[str, float]) -> None:
        """Record one round's metrics for ``system`` in ``group``."""
        self.ensure(system)
        if group not in self.groups:
            self.groups.append(group)
        samples = self._samples.setdefault((group, system), {})
        for key, value in metrics.items():
            samples.setdefault(key, []).append(float(value))

    def value(self, group: str, system: str, column: Column) -> float | None:
        """The aggregate over rounds of one metric, or None without data."""
        values = self._samples.get((group, system), {}).get(column.key)
        if not values:
            return None
        return max(values) if column.worst else median(values)

    def ratio_value(self, group: str, system: str) -> float | None:
        """This system's metric relative to the floor's, in the same group."""
        if self.ratio is None or self.floor is None:
            return None
        column = Column(self.ratio.key, "")
        mine = self.value(group, system, column)
        floor = self.value(group, self.floor, column)
        if mine is None or floor is None or mine == 0 or floor == 0:
            return None
        return floor / mine if self.ratio.higher_is_better else mine / floor

    def render(self) -> str:
        """The table as aligned text, with its title, details and notes."""
        headers = ["system"]
        for column in self.columns:
            headers.append(column.header)
            if column.spread:
                headers.append(f"{column.header.split()[0]} range")
        if self.ratio is not None:
            headers.append(self.ratio.header)
        if self.group_header:
            headers.insert(0, self.group_header)
        rows: list[list[str]] = []
        spans: list[tuple[list[str], str]] = []
        for group in self.groups:
            first = True
            for system in self._systems:
                lead = [group if first else ""] if self.group_header else []
                first = False
                cells = self._cells(group, system)
                if isinstance(cells, str):
                    spans.append(([*lead, system], cells))
                    rows.append([])
                else:
                    rows.append([*lead, system, *cells])
        widths = [len(h) for h in headers]
        for row in [*rows, *(lead for lead, _ in spans)]:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))
        lead_count = 2 if self.group_header else 1
        out = [f"{self.name}: {self.title}"]
        out.extend(f"  {line}" for line in self.details)
        out.append("  " + _join(headers, widths, lead_count))
        span_iter = iter(spans)
        for row in rows:
            if row:
                out.append("  " + _join(row, widths, lead_count))
            else:
                lead, text = next(span_iter)
                out.append("  " + _join(lead, widths, lead_count) + "  " + text)
        out.extend(self._footnotes())
        out.extend(f"  - {note}" for note in self.notes)
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        """Every sample, the aggregates and statuses, for ``--json``."""
        rows = []
        for group in self.groups:
            for system in self._systems:
                samples = self._samples.get((group, system), {})
                rows.append(
                    {
                        "group": group,
                        "system": system,
                        "status": self._status.get(system),
                        "errors": self.errors(group, system),
                        "samples": samples,
                        "aggregate": {c.key: self.value(group, system, c) for c in self.columns},
                        "ratio_to_floor": self.ratio_value(group, system),
                    }
                )
        return {
            "title": self.title,
            "details": self.details,
            "notes": self.notes,
            "floor": self.floor,
            "ratio_metric": self.ratio.key if self.ratio else None,
            "rows": rows,
        }

    def _cells(self, group: str, system: str) -> list[str] | str:
        if (group, system) not in self._samples:
            if system in self._status:
                return _clip(self._status[system])
            errors = self.errors(group, system)
            return _clip("error: " + errors[0]) if errors else "no data"
        cells = []
        for column in self.columns:
            value = self.value(group, system, column)
            cells.append("-" if value is None else f"{value:,.{column.digits}f}")
            if column.spread:
                values = self._samples[(group, system)].get(column.key) or []
                cells.append(f"{min(values):,.{column.digits}f}–{max(values):,.{column.digits}f}"
                             if values else "-")
        if self.ratio is not None:
            ratio = self.ratio_value(group, system)
            cells.append("-" if ratio is None else f"{ratio:.2f}")
        if self.errors(group, system):
            cells[-1] += " *"
        return cells

    def _footnotes(self) -> list[str]:
        lines = []
        for (group, system), errors in self._errors.items():
            cells = [group] if group is not None else self.groups
            if any((g, system) in self._samples for g in cells):
                where = f"{system} {group}" if group else system
                lines.append(f"  * {where}: failed in {len(errors)} round(s): {_clip(errors[0])}")
        return lines


def _join(cells: Sequence[str], widths: Sequence[int], lead_count: int) -> str:
    """Left-align the leading label columns, right-align the numbers."""
    parts = []
    for i, cell in enumerate(cells):
        parts.append(cell.ljust(widths[i]) if i < lead_count else cell.rjust(widths[i]))
    return "  ".join(parts).rstrip()


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_STATUS else text[: _MAX_STATUS - 1] + "…"
