#!/usr/bin/env bash
# Build the pure tests for a 32-bit build-std target and run them under user-mode qemu: the
# library's and the binary's unit tests and the fixture golden tests (the rules rendered from the
# real captures), which must pass unchanged where words are 32 bits wide (armv7, MIPS) and bytes
# are big-endian (mips). Like cross/test-aarch64.sh, nothing that needs root or starts the binary
# as a child runs here (user-mode qemu has no namespaces and no binfmt_misc registration).
#
#   cross/test-32bit.sh TARGET [extra cargo test arguments]
#
# TARGET: armv7-unknown-linux-musleabihf, mipsel-unknown-linux-musl, mips-unknown-linux-musl.
# Built as cross/build.sh builds them (the pinned nightly, -Zbuild-std, cargo-zigbuild), with
# panic=unwind, which the test harness needs.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
t=${1:?usage: cross/test-32bit.sh TARGET [cargo test arguments]}
shift
case "$t" in
armv7-unknown-linux-musleabihf) qemu="qemu-arm-static" ;;
mipsel-unknown-linux-musl) qemu="qemu-mipsel-static" ;;
mips-unknown-linux-musl) qemu="qemu-mips-static" ;;
*) echo "test-32bit.sh: unsupported target $t" >&2; exit 2 ;;
esac
command -v "$qemu" >/dev/null || { echo "test-32bit.sh: $qemu missing (tests/setup.sh)" >&2; exit 1; }
# The toolchain, zig and cargo-zigbuild, exactly as the release build gets them.
# shellcheck source=cross/toolchain.sh
. cross/toolchain.sh
zig_env

upper=$(tr 'a-z-' 'A-Z_' <<<"$t")
[ $# -gt 0 ] || set -- -- --include-ignored
echo "== cargo-zigbuild test (+$NIGHTLY) --target $t --lib --bins --test core_fixtures $*" >&2
# `cargo zigbuild` is the build subcommand only; `cargo-zigbuild test` runs cargo from PATH, so
# the toolchain is chosen through RUSTUP_TOOLCHAIN.
env RUSTUP_TOOLCHAIN="$NIGHTLY" "CARGO_TARGET_${upper}_RUSTFLAGS=-C link-self-contained=no" "CARGO_TARGET_${upper}_RUNNER=$qemu" \
	cargo-zigbuild test --locked -Zbuild-std --target "$t" --lib --bins --test core_fixtures "$@"
