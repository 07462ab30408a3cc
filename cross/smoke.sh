#!/usr/bin/env bash
# Smoke test of a 32-bit build under user-mode qemu: the binary is static and of the right
# architecture and byte order, starts, `--version` names its target, and `rules --from
# <fixtures> --kube-proxy absent` renders exactly what the host binary renders (rendering must not
# depend on word size or byte order).
#
#   cross/smoke.sh TARGET [BINARY]
#
# TARGET: armv7-unknown-linux-musleabihf (qemu-arm-static), mipsel-unknown-linux-musl
# (qemu-mipsel-static), mips-unknown-linux-musl (qemu-mips-static, big-endian). Without BINARY it
# uses target/dist/edgeproxy-TARGET, building it with cross/build.sh when missing. Fixtures:
# $EDGEPROXY_FIXTURES, default ../shared/fixtures/monitoring-cluster beside the repository.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
t=${1:?usage: cross/smoke.sh TARGET [BINARY]}
case "$t" in
armv7-unknown-linux-musleabihf) qemu=qemu-arm-static arch='ARM, EABI5' ;;
mipsel-unknown-linux-musl) qemu=qemu-mipsel-static arch='32-bit LSB executable, MIPS' ;;
mips-unknown-linux-musl) qemu=qemu-mips-static arch='32-bit MSB executable, MIPS' ;;
*) echo "smoke.sh: unsupported target $t" >&2; exit 2 ;;
esac
target_dir=${CARGO_TARGET_DIR:-$root/target}
bin=${2:-$target_dir/dist/edgeproxy-$t}
fixtures=${EDGEPROXY_FIXTURES:-$root/../shared/fixtures/monitoring-cluster}

fail() { echo "smoke $t: FAIL: $*" >&2; exit 1; }
command -v "$qemu" >/dev/null || fail "$qemu missing (tests/setup.sh)"
for f in services.json endpointslices.json; do
	[ -f "$fixtures/$f" ] || fail "no $f in $fixtures (set EDGEPROXY_FIXTURES)"
done
if [ ! -x "$bin" ]; then
	[ $# -eq 1 ] || fail "$bin: no such executable"
	cross/build.sh --target "$t" >&2
fi
file "$bin" | grep -q "$arch" || fail "$bin is not a $arch binary: $(file -b "$bin")"
file "$bin" | grep -q 'statically linked' || fail "$bin is not statically linked: $(file -b "$bin")"

version=$("$qemu" "$bin" --version) || fail "--version exited $?"
echo "$t: $version"
case "$version" in
*"($t)"*) ;;
*) fail "--version does not name $t: $version" ;;
esac

from=(--from "$fixtures/services.json" --from "$fixtures/endpointslices.json")
out=$("$qemu" "$bin" rules "${from[@]}" --kube-proxy absent) || fail "rules exited $?"
grep -q '^\*nat$' <<<"$out" || fail "no *nat table in the rendered rules"
grep -q '^COMMIT$' <<<"$out" || fail "no COMMIT in the rendered rules"
grep -q -- '-j DNAT' <<<"$out" || fail "no DNAT rule in the rendered rules"

# The same rules as the host build.
host=$target_dir/debug/edgeproxy
# Always through cargo (a no-op when current): a binary left in a shared target directory by an
# earlier commit would compare against stale rules.
cargo build --locked --bin edgeproxy >&2
host_out=$("$host" rules "${from[@]}" --kube-proxy absent) || fail "host rules exited $?"
if [ "$out" != "$host_out" ]; then
	diff <(echo "$host_out") <(echo "$out") >&2 || true
	fail "the $t rules differ from the host's"
fi
echo "$t: rules from $(basename "$fixtures") render $(grep -c -- '^-A' <<<"$out") rules, identical to the host build"
echo "smoke $t: ok"
