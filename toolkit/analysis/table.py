"""A small tidy table (rows of dicts, one schema) that renders in Jupyter: no pandas dependency."""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any


class Table:
    """Rows with the same columns; `table["col"]` is a column, `table.rows` the dicts, `to_pandas()` if installed."""

    def __init__(self, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]
        cols = list(columns) if columns is not None else []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        self.columns: list[str] = cols

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return self.rows[key]
        if key not in self.columns:
            raise KeyError(f"no column {key!r}; columns: {self.columns}")
        return [r.get(key) for r in self.rows]

    def where(self, **equals: Any) -> Table:
        """Rows whose columns equal the given values."""
        return Table([r for r in self.rows if all(r.get(k) == v for k, v in equals.items())], self.columns)

    def sort(self, key: str, *, descending: bool = False) -> Table:
        return Table(sorted(self.rows, key=lambda r: r[key], reverse=descending), self.columns)

    def group_mean(self, by: str | Sequence[str], value: str) -> Table:
        """Mean of `value` (and the row count) per distinct value of `by`, in first-seen order."""
        by = [by] if isinstance(by, str) else list(by)
        groups: dict[tuple, list[float]] = {}
        for r in self.rows:
            groups.setdefault(tuple(r[b] for b in by), []).append(float(r[value]))
        return Table([{**dict(zip(by, k, strict=True)), value: sum(v) / len(v), "n": len(v)} for k, v in groups.items()])

    def map(self, column: str, fn: Callable[[dict[str, Any]], Any]) -> Table:
        """A copy with `column` set to fn(row) for every row."""
        return Table([{**r, column: fn(r)} for r in self.rows], self.columns + ([column] if column not in self.columns else []))

    def to_pandas(self) -> Any:
        import pandas as pd  # optional: only if the user has it

        return pd.DataFrame(self.rows, columns=self.columns)

    def _fmt(self, v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        s = str(v)
        return s if len(s) <= 80 else s[:77] + "..."

    def __repr__(self) -> str:
        head = self.rows[:20]
        widths = [max([len(c)] + [len(self._fmt(r.get(c))) for r in head]) for c in self.columns]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True))]
        lines += ["  ".join(self._fmt(r.get(c)).ljust(w) for c, w in zip(self.columns, widths, strict=True)) for r in head]
        if len(self.rows) > len(head):
            lines.append(f"... {len(self.rows) - len(head)} more rows")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(self._fmt(r.get(c)))}</td>"
                                        for c in self.columns) + "</tr>" for r in self.rows[:200])
        more = f"<p>{len(self.rows) - 200} more rows</p>" if len(self.rows) > 200 else ""
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"
