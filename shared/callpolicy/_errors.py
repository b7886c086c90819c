"""The package's own exceptions; all derive from :class:`CallPolicyError`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["AllModelsFailedError", "CallPolicyError", "CircuitOpenError", "IncompleteStreamError"]


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
        reason: why the circuit was opened (its last trip), or ``None`` when the store
            does not know: ``"threshold"`` (``failure_threshold`` consecutive failures),
            ``"failure_rate"`` (``failure_rate_threshold`` reached over the window),
            ``"probe_failed"`` (a half-open probe failed) or ``"manual"`` (forced open by
            hand: :meth:`~callpolicy.CallPolicy.force_open` or a store's ``force``). The
            same words as the reason of the :class:`~callpolicy.Transition` to open.
    """

    # A refused call builds one of these, often thousands a second during an outage: the
    # fields go in slots and the message is written only when someone reads it (``str``,
    # ``repr``, ``args``), never on the refusal itself.
    __slots__ = ("_args_given", "failures", "model", "provider", "reason", "retry_in")

    def __init__(
        self,
        provider: str,
        model: str,
        failures: int,
        retry_in: float | None,
        *,
        reason: str | None = None,
    ) -> None:
        # No super().__init__: ``args`` below answers with the message instead.
        self.provider, self.model, self.reason = provider, model, reason
        self.failures, self.retry_in = failures, retry_in

    def __str__(self) -> str:
        if _given_args(self) is not None:  # set by hand: str follows them, as on any error
            return BaseException.__str__(self)
        return (
            f"circuit open for {self.provider}/{self.model}: "
            f"{_why(self.reason, self.failures)}; {_when(self.retry_in, self.reason)}"
        )

    def __repr__(self) -> str:
        if _given_args(self) is not None:
            return BaseException.__repr__(self)
        return f"{type(self).__name__}({str(self)!r})"

    @property
    def args(self) -> tuple[object, ...]:
        """``(message,)``, as the exception's constructor would have stored it."""
        given = _given_args(self)
        return (str(self),) if given is None else given

    @args.setter
    def args(self, value: Iterable[object]) -> None:
        _ARGS.__set__(self, value)  # where BaseException's own str and repr read them
        self._args_given = _ARGS.__get__(self)

    def __reduce__(self) -> tuple[object, ...]:
        # Keep the exception copyable (copy, multiprocessing) with its fields.
        fields = (self.provider, self.model, self.failures, self.retry_in)
        if self.reason is None:
            return (type(self), fields)
        return (_rebuild_circuit_open, (type(self), *fields, self.reason))


_ARGS: Any = BaseException.__dict__["args"]  # BaseException's own field, under the property
_new_error = BaseException.__new__


def refusal(
    provider: str, model: str, failures: int, retry_in: float | None, reason: str | None
) -> CircuitOpenError:
    """``CircuitOpenError(provider, model, failures, retry_in, reason=reason)``, built the
    way a store refuses: without the keyword call, which costs as much as the rest."""
    error: CircuitOpenError = _new_error(CircuitOpenError)
    error.provider, error.model, error.reason = provider, model, reason
    error.failures, error.retry_in = failures, retry_in
    return error


def _given_args(error: CircuitOpenError) -> tuple[object, ...] | None:
    """The ``args`` assigned to ``error`` by hand (rare), if any: then they, not its
    fields, make its message."""
    given: tuple[object, ...] | None = getattr(error, "_args_given", None)
    return given


class IncompleteStreamError(CallPolicyError):
    """A guarded stream ended without its provider's end marker (a finish reason): cut
    short, though the transport said nothing. Raised after the stream's last chunk, and
    counted against the circuit as a failure (classified ``network``).

    Attributes:
        key: the circuit key (``provider::model``) of the stream that was cut short.
        chunks: how many chunks it delivered before it ended.
    """

    def __init__(self, key: str, chunks: int) -> None:
        self.key = key
        self.chunks = chunks
        super().__init__(
            f"the stream of {key} ended after {chunks} chunk{'s' if chunks != 1 else ''} "
            "without the provider's end marker (cut short)"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.key, self.chunks))


class AllModelsFailedError(CallPolicyError):
    """Raised when a list of fallbacks ends without an answer: the primary and every
    fallback tried failed, or were skipped because their circuit was open.

    The message names every model tried, in order, with its error's type (never its
    message, which can carry request data). ``__cause__`` is the last model's error.

    Attributes:
        keys: the circuit keys tried, in order, the primary's first (``None`` for a
            fallback run without a circuit of its own).
        errors: each one's error, in the same order: the provider's exception, or the
            :class:`CircuitOpenError` of a model skipped because its circuit was open.
        exceptions: ``errors``, under the name an ``ExceptionGroup`` gives them.
    """

    def __init__(self, keys: tuple[str | None, ...], errors: tuple[BaseException, ...]) -> None:
        if len(keys) != len(errors):
            raise ValueError("keys and errors: expected one error per key")
        self.keys = keys
        self.errors = errors
        tried = "; ".join(
            f"{key or 'an unguarded fallback'}: {_described(error)}"
            for key, error in zip(keys, errors, strict=True)
        )
        super().__init__(f"every model failed ({len(keys)} tried): {tried}")

    @property
    def exceptions(self) -> tuple[BaseException, ...]:
        return self.errors

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.keys, self.errors))


def _described(error: BaseException) -> str:
    if isinstance(error, CircuitOpenError):
        return "circuit open (not called)"
    return type(error).__name__


def _when(retry_in: float | None, reason: str | None) -> str:
    """When a probe may go, in plain words (``CircuitOpenError``'s message)."""
    if retry_in is None:
        return "held until reset" if reason == "manual" else "forced open until reset"
    if retry_in > 0:
        return f"next probe in {retry_in:.2f}s"
    return "half-open, probe in flight"


def _why(reason: str | None, failures: int) -> str:
    """Why a circuit is open, in plain words (``CircuitOpenError``'s message)."""
    if reason is None or reason == "threshold":
        return f"{failures} consecutive failures"
    if reason == "failure_rate":
        return "failure rate over the window reached"
    if reason == "probe_failed":
        return "the half-open probe failed"
    if reason == "manual":
        return "opened by hand (force_open)"
    return f"opened ({reason})"


def _rebuild_circuit_open(
    cls: type[CircuitOpenError],
    provider: str,
    model: str,
    failures: int,
    retry_in: float | None,
    reason: str | None,
) -> CircuitOpenError:
    return cls(provider, model, failures, retry_in, reason=reason)


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
