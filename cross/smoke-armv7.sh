#!/usr/bin/env bash
# Smoke test of the armv7 binary under qemu-arm-static: it starts, `--version` names its target,
# and `rules --from <fixtures> --kube-proxy absent` renders exactly what the host binary renders.
#
#   cross/smoke-armv7.sh [ARMV7_BINARY]
#
# Without an argument it uses target/dist/edgeproxy-armv7-unknown-linux-musleabihf, building it
# with cross/build.sh when missing. Fixtures: $EDGEPROXY_FIXTURES, default
# ../shared/fixtures/monitoring-cluster beside the repository.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
t=armv7-unknown-linux-musleabihf
target_dir=${CARGO_TARGET_DIR:-$root/target}
bin=${1:-$target_dir/dist/edgeproxy-$t}
fixtures=${EDGEPROXY_FIXTURES:-$root/../shared/fixtures/monitoring-cluster}

fail() { echo "smoke-armv7: FAIL: $*" >&2; exit 1; }
command -v qemu-arm-static >/dev/null || fail "qemu-arm-static missing (tests/setup.sh)"
for f in services.json endpointslices.json; do
	[ -f "$fixtures/$f" ] || fail "no $f in $fixtures (set EDGEPROXY_FIXTURES)"
done
if [ ! -x "$bin" ]; then
	[ $# -eq 0 ] || fail "$bin: no such executable"
	cross/build.sh --target "$t" >&2
fi
file "$bin" | grep -q 'ARM, EABI5' || fail "$bin is not a 32-bit ARM binary: $(file -b "$bin")"
file "$bin" | grep -q 'statically linked' || fail "$bin is not statically linked: $(file -b "$bin")"

version=$(qemu-arm-static "$bin" --version) || fail "--version exited $?"
echo "armv7: $version"
case "$version" in
*"($t)"*) ;;
*) fail "--version does not name $t: $version" ;;
esac

from=(--from "$fixtures/services.json" --from "$fixtures/endpointslices.json")
arm_out=$(qemu-arm-static "$bin" rules "${from[@]}" --kube-proxy absent) || fail "rules exited $?"
grep -q '^\*nat$' <<<"$arm_out" || fail "no *nat table in the rendered rules"
grep -q '^COMMIT$' <<<"$arm_out" || fail "no COMMIT in the rendered rules"
grep -q -- '-j DNAT' <<<"$arm_out" || fail "no DNAT rule in the rendered rules"

# The same rules as the host build: rendering must not depend on the architecture.
host=$target_dir/debug/edgeproxy
# Always through cargo (a no-op when current): a binary left in a shared target directory by an
# earlier commit would compare against stale rules.
cargo build --locked --bin edgeproxy >&2
host_out=$("$host" rules "${from[@]}" --kube-proxy absent) || fail "host rules exited $?"
if [ "$arm_out" != "$host_out" ]; then
	diff <(echo "$host_out") <(echo "$arm_out") >&2 || true
	fail "armv7 rules differ from the host's"
fi
echo "armv7: rules from $(basename "$fixtures") render $(grep -c -- '^-A' <<<"$arm_out") rules, identical to the host build"
echo "smoke-armv7: ok"
