"""Tables of circuit state: plain text for ``repr`` and terminals, HTML for notebooks."""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping

from ._types import CircuitSnapshot

__all__ = ["html_table", "text_table"]

# Each column: its header in one or two short lines (a terminal is narrow), and what it
# counts in full (under the text table, as tooltips in HTML).
_COLUMNS: tuple[tuple[tuple[str, str], str], ...] = (
    (("key", ""), "the circuit's provider::model"),
    (("state", ""), "closed, open or half_open; (forced) when set by hand"),
    (("opened by", ""), "what opened the circuit: threshold, failure_rate, probe_failed, manual"),
    (("failures", "in a row"), "consecutive counted failures (while open: those that opened it)"),
    (("next probe", "in"), "time until an open circuit admits a probe (now: the next call)"),
    (("times", "opened"), "how often this circuit has opened since it was created"),
    (("probes", "in flight"), "half-open probes admitted and not finished yet"),
    (("sent to", "fallback"), "calls of this key handed to its fallback, in this process"),
)
_HEADERS = tuple(" ".join(part for part in name if part) for name, _ in _COLUMNS)
_FALLBACK_NOTE = (
    "A fallback model has a circuit of its own, so a row of its own; 'sent to fallback'\n"
    "counts, on the primary's row, the calls handed to its fallback."
)
_COLOURS = {"closed": "#1a7f37", "open": "#cf222e", "half_open": "#9a6700"}


def _printable(text: str) -> str:
    """``text`` with each control or other non-printable character escaped (``\\n``,
    ``\\x1b``, ``\\u202e``), so a model name cannot break a row or restyle a terminal."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


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
        _printable(snapshot.key),
        state,
        _printable(snapshot.opened_by or "-"),
        str(snapshot.failures),
        when,
        str(snapshot.trips),
        str(snapshot.probes_in_flight),
        str(fallback_served),
    )


def text_table(
    snapshots: Iterable[CircuitSnapshot], fallback_served: Mapping[str, int] | None = None
) -> str:
    """A fixed-width table under a two-line header, one circuit a row, then a note on the
    fallback's rows (the fallback column and its note are left out when
    ``fallback_served`` is None: a shared store does not know it)."""
    served = fallback_served or {}
    columns = len(_HEADERS) if fallback_served is not None else len(_HEADERS) - 1
    body = [_cells(s, served.get(s.key, 0))[:columns] for s in snapshots]
    if not body:
        return "(no circuits yet)"
    heads = [tuple(name[line] for name, _ in _COLUMNS[:columns]) for line in (0, 1)]
    rows = [*heads, *body]
    widths = [max(len(row[i]) for row in rows) for i in range(columns)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(2, "  ".join("-" * width for width in widths))
    if fallback_served is not None:
        lines.append(_FALLBACK_NOTE)
    return "\n".join(line.rstrip() for line in lines)


def html_table(
    snapshots: Iterable[CircuitSnapshot], fallback_served: Mapping[str, int] | None = None
) -> str:
    """An HTML table for Jupyter, the state cell coloured, each header explained in its
    tooltip, the fallback note as the caption."""
    served = fallback_served or {}
    head = "".join(
        f'<th title="{html.escape(note)}">{html.escape(name)}</th>'
        for name, (_, note) in zip(_HEADERS, _COLUMNS, strict=True)
    )
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
    note = html.escape(" ".join(_FALLBACK_NOTE.split()))
    caption = f'<caption style="caption-side:bottom">{note}</caption>'
    return (
        '<table class="callpolicy">'
        + caption
        + "<thead><tr>"
        + head
        + "</tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table>"
    )
