"""Shared printing of benchmark results."""

from __future__ import annotations


def format_table(title: str, res: dict, rows: list[tuple[str, str]]) -> str:
    """One line per ``(key, unit)`` of ``res``: floats to 4 significant digits, others as they are."""
    width = max(len(k) for k, _ in rows) + 2
    lines = [title]
    for k, unit in rows:
        v = res[k]
        lines.append(f"  {k:<{width}} {v:>12.4g} {unit}" if isinstance(v, float) else f"  {k:<{width}} {v:>12} {unit}")
    return "\n".join(lines)
