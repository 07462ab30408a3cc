#!/usr/bin/env bash
# Build the tests for aarch64-unknown-linux-musl and run them under qemu-aarch64-static (the
# runner in .cargo/config.toml). Only the test targets that need no root run here: user-mode
# qemu cannot create network namespaces, and nothing registers binfmt_misc for aarch64, so a
# test that starts the aarch64 edgeproxy binary as a child cannot run either.
#
#   cross/test-aarch64.sh [extra cargo test arguments]
#
# Test targets run (by name): the library's unit tests (--lib), the binary's (--bins), and the
# integration tests listed in NOROOT_TESTS below (the fixture golden tests, the reflector against
# the in-process HTTPS API server, notify, ops). Left out: the namespace tests (root),
# packaging (starts the binary itself; runs natively in CI).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target=aarch64-unknown-linux-musl
read -r -a NOROOT_TESTS <<<"${EDGEPROXY_AARCH64_TESTS:-notify ops core_fixtures source_reflector}"

command -v qemu-aarch64-static >/dev/null || { echo "test-aarch64.sh: qemu-aarch64-static missing (tests/setup.sh)" >&2; exit 1; }
command -v aarch64-linux-gnu-gcc >/dev/null || { echo "test-aarch64.sh: aarch64-linux-gnu-gcc missing (tests/setup.sh)" >&2; exit 1; }
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

args=(--locked --target "$target" --lib --bins)
for t in "${NOROOT_TESTS[@]}"; do
	args+=(--test "$t")
done
# The listed targets need no root; a test there marked #[ignore = "needs TOOL"] (promtool) runs
# too, as in tests/run-all.sh: nothing is skipped silently.
[ $# -gt 0 ] || set -- -- --include-ignored
echo "== cargo test ${args[*]} $*" >&2
cargo test "${args[@]}" "$@"
