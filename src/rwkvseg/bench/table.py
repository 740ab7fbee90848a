"""Plain-text tables and JSON results for the benchmark commands."""

from __future__ import annotations


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """rows of dicts -> aligned text; columns = [(key, header)]; floats get 3 significant digits."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    cells = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(header), *(len(r[i]) for r in cells)) for i, (_, header) in enumerate(columns)]
    lines = ["  ".join(h.rjust(wd) for (_, h), wd in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * wd for wd in widths))
    lines += ["  ".join(c.rjust(wd) for c, wd in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
