"""What a :class:`~callpolicy.Budget` reports: :class:`BudgetUsage`, its counters against
its limits, as :meth:`Budget.usage <callpolicy.Budget.usage>` returns them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ._budget_store import COST_UNITS_PER_USD, BudgetLimits, Tally

__all__ = ["BudgetUsage"]


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """What a budget has used, as :meth:`Budget.usage` reports it.

    Totals are lifetime totals (since creation or :meth:`Budget.reset`) and include the
    estimates held by calls still in flight. With a window, the ``window_*`` fields give
    what was spent in the last ``window`` seconds, and the limits and ``remaining_*`` apply
    to those; without one they apply to the totals. ``None`` limits are unbounded.
    """

    key: str | None
    """The key these counters belong to (per-key budgets), or None for a shared budget."""
    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    estimated_calls: int
    """Calls whose usage the model did not report, counted by their estimate."""
    in_flight: int
    window: float | None
    window_calls: int | None
    window_tokens: int | None
    window_cost_usd: float | None
    max_calls: int | None
    max_tokens: int | None
    max_cost_usd: float | None
    remaining_calls: int | None
    remaining_tokens: int | None
    remaining_cost_usd: float | None

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (``tokens`` included)."""
        data = asdict(self)
        data["tokens"] = self.tokens
        return data

    @classmethod
    def of(
        cls, key: str | None, tally: Tally, limits: BudgetLimits, *, max_cost_usd: float | None
    ) -> BudgetUsage:
        """The report of a store's ``tally`` against a budget's ``limits`` (its
        ``max_cost_usd`` as given, which ``limits`` holds in cost units)."""
        window = limits.window
        if window is None:
            used_calls = tally.calls
            used_tokens = tally.input_tokens + tally.output_tokens
            used_cost = tally.cost_units
        else:
            used_calls = tally.window_calls or 0
            used_tokens = tally.window_tokens or 0
            used_cost = tally.window_cost_units or 0
        remaining_cost = _left(limits.max_cost_units, used_cost)
        return cls(
            key=key,
            calls=tally.calls,
            input_tokens=tally.input_tokens,
            output_tokens=tally.output_tokens,
            cost_usd=tally.cost_units / COST_UNITS_PER_USD,
            estimated_calls=tally.estimated_calls,
            in_flight=tally.in_flight,
            window=window,
            window_calls=tally.window_calls,
            window_tokens=tally.window_tokens,
            window_cost_usd=(
                None
                if tally.window_cost_units is None
                else tally.window_cost_units / COST_UNITS_PER_USD
            ),
            max_calls=limits.max_calls,
            max_tokens=limits.max_tokens,
            max_cost_usd=max_cost_usd,
            remaining_calls=_left(limits.max_calls, used_calls),
            remaining_tokens=_left(limits.max_tokens, used_tokens),
            remaining_cost_usd=(
                None if remaining_cost is None else remaining_cost / COST_UNITS_PER_USD
            ),
        )


def _left(limit: int | None, used: int) -> int | None:
    return None if limit is None else max(limit - used, 0)
