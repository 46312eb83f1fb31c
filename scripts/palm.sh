#!/usr/bin/env bash
# Install palm into .venv if needed, then run the `palm` command with the given arguments.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh"
exec "$root/.venv/bin/palm" "$@"
