#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs jaxmoe with its test extra
# (idempotent: reinstalls only when pyproject.toml changes), then runs the chosen job.
#   bash run.sh demo   # the main job: train the tiny preset on the built-in corpus (CPU, minutes)
#   bash run.sh test   # the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.jaxmoe-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
job=${1:-demo}
shift || true
case "$job" in
  demo) exec .venv/bin/python -m jaxmoe.train --config tiny --workdir "${WORKDIR:-runs/tiny}" "$@" ;;
  test) exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh {demo|test} [args...]" >&2; exit 2 ;;
esac
