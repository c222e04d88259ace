"""Markdown pieces shared by the benchmark pages."""

from __future__ import annotations


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def times(value: float | None) -> str:
    """A ratio as "2.69x" ("n/a" when it was not measured)."""
    return "n/a" if value is None else f"{value:.2f}x"
