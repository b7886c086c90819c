"""``python -m callpolicy status``: the state of the circuits shared in a Redis store."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from ._errors import CallPolicyError
from ._redact import redact

_DESCRIPTION = "callpolicy's command-line tools."

_STATUS_DESCRIPTION = """\
Print the state of the circuits that the processes of an app share in Redis
(RedisStore.from_url(URL, prefix=PREFIX)): one row per circuit with state in Redis.

Which circuits are listed: every circuit under the prefix that has recorded a
failure, been tripped or reset by hand, or admitted a half-open probe, until its
keys expire (key_ttl after their last change, one day by default). A circuit that
has only ever succeeded has nothing in Redis (a clean success writes nothing), so
it is not listed: it is closed. The counters (calls, fallbacks) are per process
and not in Redis.

Exit status: 0 printed; 1 Redis could not be read (unreachable, or it refused
the credentials or permissions); 2 bad arguments."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default shown; the description's paragraphs kept as written."""


def _rounded(value: Any) -> Any:
    """Seconds to the millisecond (Redis's resolution), not 29.995152729999916."""
    return round(value, 3) if isinstance(value, float) else value


def _status(args: argparse.Namespace) -> int:
    try:
        from callpolicy.redis import RedisStore
    except ImportError:  # pragma: no cover - depends on the extra
        print(
            "callpolicy status needs the redis extra: pip install 'callpolicy[redis]'",
            file=sys.stderr,
        )
        return 2
    from ._report import text_table

    url = redact(args.redis)
    try:
        store = RedisStore.from_url(args.redis, prefix=args.prefix, socket_timeout=args.timeout)
    except ValueError as exc:  # not a Redis URL
        print(f"--redis: {redact(str(exc))} (got {url})", file=sys.stderr)
        return 2
    with store:
        try:
            snapshots = [store.circuit_for_key(k).shared_snapshot() for k in store.shared_keys()]
        except CallPolicyError as exc:  # unreachable, refused: named, without a password
            print(f"cannot read {url}: {redact(str(exc))}", file=sys.stderr)
            return 1
        except Exception as exc:  # anything else, plainly: this is an operator's tool
            print(f"cannot read {url}: {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr)
            return 1
    if args.json:
        rows = [{k: _rounded(v) for k, v in asdict(s).items()} for s in snapshots]
        print(json.dumps(rows, default=str, indent=2))
    else:
        print(text_table(snapshots))
    return 0


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m callpolicy", description=_DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser(
        "status",
        help="print the state of the circuits shared in a Redis store",
        description=_STATUS_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    status.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/0",
        metavar="URL",
        help="the Redis server: redis://[user:password@]host:port/db",
    )
    status.add_argument(
        "--prefix", default="callpolicy", help="the key prefix the stores were given"
    )
    status.add_argument("--timeout", type=_positive, default=2.0, help="socket timeout, in seconds")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    return _status(args)


if __name__ == "__main__":
    sys.exit(main())
