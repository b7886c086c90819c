"""The package's own exceptions; all derive from :class:`CallPolicyError`."""

from __future__ import annotations

__all__ = ["CallPolicyError", "CircuitOpenError"]


class CallPolicyError(Exception):
    """Base class of every error raised by callpolicy itself (never of a provider's errors)."""


class CircuitOpenError(CallPolicyError):
    """Raised instead of calling the model while its circuit is open.

    Attributes:
        provider: the provider part of the circuit key.
        model: the model part of the circuit key.
        failures: consecutive counted failures that opened the circuit.
        retry_in: seconds until a probe will be admitted; ``0.0`` when the circuit is
            half-open and its probe slots are all taken; ``None`` when forced open.
    """

    def __init__(self, provider: str, model: str, failures: int, retry_in: float | None) -> None:
        self.provider = provider
        self.model = model
        self.failures = failures
        self.retry_in = retry_in
        if retry_in is None:
            when = "forced open until reset"
        elif retry_in > 0:
            when = f"next probe in {retry_in:.2f}s"
        else:
            when = "half-open, probe in flight"
        super().__init__(
            f"circuit open for {provider}/{model}: {failures} consecutive failures; {when}"
        )

    def __reduce__(self) -> tuple[object, ...]:
        # Keep the exception copyable (copy, multiprocessing) with its fields.
        return (type(self), (self.provider, self.model, self.failures, self.retry_in))


def add_note(exc: BaseException, note: str) -> None:
    """PEP 678 ``add_note``, also on Python 3.10 (where the note is kept in ``__notes__``
    but not printed by the traceback)."""
    adder = getattr(exc, "add_note", None)
    if adder is not None:
        adder(note)
        return
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
        exc.__notes__ = notes  # type: ignore[attr-defined]
    notes.append(note)
