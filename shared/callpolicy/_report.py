"""Tables of circuit state: plain text for ``repr`` and terminals, HTML for notebooks."""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping

from ._types import CircuitSnapshot

__all__ = ["html_table", "text_table"]

_HEADERS = (
    "key",
    "state",
    "opened by",
    "failures",
    "next probe",
    "trips",
    "probes",
    "fallback served",
)
_COLOURS = {"closed": "#1a7f37", "open": "#cf222e", "half_open": "#9a6700"}


def _cells(snapshot: CircuitSnapshot, fallback_served: int) -> tuple[str, ...]:
    if snapshot.retry_in is None:
        held = snapshot.forced is not None and snapshot.state.value == "open"
        when = "held open" if held else "-"
    elif snapshot.retry_in == 0:
        when = "now"
    else:
        when = f"{snapshot.retry_in:.1f}s"
    state = snapshot.state.value + (" (forced)" if snapshot.forced is not None else "")
    return (
        snapshot.key,
        state,
        snapshot.opened_by or "-",
        str(snapshot.failures),
        when,
        str(snapshot.trips),
        str(snapshot.probes_in_flight),
        str(fallback_served),
    )


def text_table(
    snapshots: Iterable[CircuitSnapshot], fallback_served: Mapping[str, int] | None = None
) -> str:
    """A fixed-width table, one circuit a row (without the fallback column when
    ``fallback_served`` is None: a shared store does not know it)."""
    served = fallback_served or {}
    columns = len(_HEADERS) if fallback_served is not None else len(_HEADERS) - 1
    rows = [
        _HEADERS[:columns],
        *(_cells(s, served.get(s.key, 0))[:columns] for s in snapshots),
    ]
    if len(rows) == 1:
        return "(no circuits yet)"
    widths = [max(len(row[i]) for row in rows) for i in range(columns)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def html_table(
    snapshots: Iterable[CircuitSnapshot], fallback_served: Mapping[str, int] | None = None
) -> str:
    """An HTML table for Jupyter, the state cell coloured."""
    served = fallback_served or {}
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _HEADERS)
    body = []
    for snapshot in snapshots:
        cells = _cells(snapshot, served.get(snapshot.key, 0))
        colour = _COLOURS.get(snapshot.state.value, "inherit")
        tds = [
            f'<td style="color:{colour};font-weight:bold">{html.escape(cell)}</td>'
            if index == 1
            else f"<td>{html.escape(cell)}</td>"
            for index, cell in enumerate(cells)
        ]
        body.append("<tr>" + "".join(tds) + "</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(_HEADERS)}">no circuits yet</td></tr>')
    return (
        '<table class="callpolicy"><thead><tr>'
        + head
        + "</tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table>"
    )
