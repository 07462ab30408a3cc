#!/usr/bin/env bash
# The one command that runs every test (README). Needs root: many tests build network
# namespaces; they fail loudly, never skip, without it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "run-all: run as root (the namespace tests need it): sudo tests/run-all.sh" >&2
  exit 2
fi
tests/setup.sh
cargo test --all-targets -- --test-threads="${TEST_THREADS:-2}"
