"""``python -m callpolicy status --redis URL``: the state of every circuit in a Redis store."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


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

    with RedisStore.from_url(args.redis, prefix=args.prefix, socket_timeout=args.timeout) as store:
        try:
            keys = store.shared_keys()
        except Exception as exc:  # report the failure plainly: this is an operator's tool
            print(f"cannot read {args.redis}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        snapshots = [store.circuit_for_key(key).snapshot() for key in keys]
    if args.json:
        print(json.dumps([asdict(s) for s in snapshots], default=str, indent=2))
    else:
        print(text_table(snapshots))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m callpolicy")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="print every circuit's state in a Redis store")
    status.add_argument("--redis", required=True, metavar="URL", help="redis://host:port/db")
    status.add_argument("--prefix", default="callpolicy", help="the stores' key prefix")
    status.add_argument("--timeout", type=float, default=2.0, help="socket timeout, seconds")
    status.add_argument("--json", action="store_true", help="JSON instead of a table")
    args = parser.parse_args(argv)
    return _status(args)


if __name__ == "__main__":
    sys.exit(main())
