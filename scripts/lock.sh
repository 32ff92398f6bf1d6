#!/usr/bin/env bash
# Regenerate requirements.lock: every package that `pip install ".[test]"` needs, pinned to one version,
# resolved for Linux / Python 3.11 with torch 2.13.0. Run it after changing a range in pyproject.toml,
# then install from the new lock in a fresh venv and run the tests before committing it:
#   scripts/lock.sh
#   python3 -m venv /tmp/v && /tmp/v/bin/pip install torch==2.13.0 && /tmp/v/bin/pip install -r requirements.lock \
#     && /tmp/v/bin/pip install --no-deps -e . && /tmp/v/bin/python -m pytest -m "not slow and not gpu" -q
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
# pip-tools lives in a throwaway venv so that it never changes the environment it locks for.
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q 'pip-tools>=7.4,<8'
CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$tools/venv/bin/pip-compile" --quiet --extra test --strip-extras \
  --allow-unsafe --no-emit-index-url --no-emit-trusted-host --no-emit-find-links --newline LF \
  --output-file requirements.lock pyproject.toml
# Any torch 2.13.0 build satisfies the lock (the CPU wheel here, the CUDA one in the worker image): the
# local version label (+cpu) is dropped so that the pin does not name one build.
sed -i -E 's/^torch==([0-9.]+)\+[a-z0-9]+$/torch==\1/' requirements.lock
grep -q '^torch==2\.13\.0$' requirements.lock || { echo "requirements.lock: torch is not pinned to 2.13.0" >&2; exit 1; }
