#!/usr/bin/env bash
# The two commands README.md gives: `scripts/run.sh demo` runs the main job on embedded
# defaults, `scripts/run.sh test` runs the whole test suite. Both set everything up first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# Prefect: quiet, no telemetry, its own home inside the project so runs never touch ~/.prefect.
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.hotspare/prefect}"
mkdir -p "$PREFECT_HOME"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_UI_ENABLED="${PREFECT_SERVER_UI_ENABLED:-true}"
cmd=${1:-}
shift || true
case "$cmd" in
  demo) exec hotspare demo "$@" ;;
  # Two workers: most tests wait on QEMU guests, servers and timers, not on a core. A file's
  # tests stay on one worker (its module fixtures are built once).
  test) exec python -m pytest -q -n "${HOTSPARE_TEST_WORKERS:-2}" --dist loadfile "$@" ;;
  *) echo "usage: scripts/run.sh demo|test [ARGS...]" >&2; exit 2 ;;
esac
