#!/usr/bin/env bash
# The test command: sets up .venv with every test dependency (and redis-server, which the
# Redis tests start on 127.0.0.1 themselves), then runs the whole suite. Extra arguments
# go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is needed by the tests: sudo apt-get install -y redis-server" >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e ".[dev]"
exec .venv/bin/python -m pytest "$@"
