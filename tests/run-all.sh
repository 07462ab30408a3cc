#!/usr/bin/env bash
# The one command that runs every test (README): installs and checks what the tests need
# (tests/setup.sh), then runs every test target including the ones marked #[ignore = "needs ..."]
# (root and network namespaces, promtool, shellcheck, systemd-analyze). Plain `cargo test` runs
# only the tests that need nothing; this runs them all, and fails loudly, never skips, when it is
# not root. tests/README.md says which test needs what.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "run-all: run as root (the namespace tests need it): sudo tests/run-all.sh" >&2
  exit 2
fi
tests/setup.sh
cargo test --locked --all-targets -- --include-ignored --test-threads="${TEST_THREADS:-2}"
