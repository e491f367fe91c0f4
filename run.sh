#!/usr/bin/env bash
# The project's two commands (see README):
#   ./run.sh lab [--headless]   set up, prepare the default model, open JupyterLab on notebooks/
#                               (--headless or TOOLKIT_HEADLESS=1: execute the quickstart instead)
#   ./run.sh test [pytest args] set up with the dev extra, lint, run the whole test suite
# Setup is idempotent: a virtualenv in $TOOLKIT_VENV (default .venv), torch's CPU wheel first,
# then everything else under constraints.txt so no later pip call can pull CUDA packages.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${TOOLKIT_VENV:-.venv}"
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false

setup() {  # $1: pip extras
  local extras="$1" stamp want
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  stamp="$VENV/.toolkit-installed"
  want="$extras $(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  echo "== installing into $VENV (extras: $extras)"
  "$VENV/bin/pip" install -q "torch==2.13.0" 2> >(grep -v "is ignored: it is neither" >&2)
  "$VENV/bin/pip" install -q -c constraints.txt -e ".[$extras]" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
}

ensure_browser() {  # tests/browser drive Debian's chromium through playwright (never `playwright install`)
  command -v chromium >/dev/null 2>&1 && return
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing chromium for the browser tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "== no chromium: tests/browser will skip (install it, e.g. apt-get install chromium; CI=true fails instead)" >&2
  fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
  lab)
    headless="${TOOLKIT_HEADLESS:-0}"
    if [ "${1:-}" = "--headless" ]; then headless=1; shift; fi
    setup "lab,dev"
    "$VENV/bin/python" -m toolkit prepare
    if [ "$headless" = "1" ]; then
      out="${TOOLKIT_OUT:-build/notebooks}"
      mkdir -p "$out"
      "$VENV/bin/jupyter" nbconvert --to notebook --execute --ExecutePreprocessor.timeout=1200 \
        --output-dir "$out" notebooks/00_quickstart.ipynb
      "$VENV/bin/python" -m toolkit summarize "$out/00_quickstart.ipynb"
    else
      extra=(); [ "$(id -u)" = "0" ] && extra+=(--allow-root)
      exec "$VENV/bin/jupyter" lab "${extra[@]}" --notebook-dir=notebooks "$@"
    fi
    ;;
  test)
    setup "lab,dev"
    ensure_browser
    echo "== ruff"
    "$VENV/bin/ruff" check .
    echo "== pytest"
    "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./run.sh lab [--headless] | ./run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
