#!/usr/bin/env bash
# Installs what the builds, tests, the demo and the benchmarks need on Debian 12, as root, and then
# checks that each tool they rely on actually works (a package can install and still leave a tool
# unusable: gcc-aarch64-linux-gnu without its Recommends has no C headers). Idempotent: packages
# already present are not reinstalled. Services that packages would start are not started.
#
#   tests/setup.sh            install what is missing, then check every tool
#   tests/setup.sh --check    check only (no apt, no rustup); exit 1 naming the first broken tool
set -euo pipefail

check_only=false
[ "${1:-}" = --check ] && check_only=true

# Every package, with what needs it. --no-install-recommends keeps the machine small, so every
# package whose Recommends we rely on is named here explicitly (the cross C headers above all).
packages=(
	iptables iproute2 iputils-ping socat curl procps psmisc util-linux # namespace tests, demo
	nftables                                                          # the nftables layout (nft)
	file tar gzip                                                     # cross/, packaging tests
	gcc libc6-dev                                                     # ring's C code (x86_64 musl)
	g++                                                               # libFuzzer (fuzz/run.sh)
	gcc-aarch64-linux-gnu libc6-dev-arm64-cross                       # ring's C code, aarch64 linker
	qemu-user-static                                                  # aarch64/armv7/mipsel/mips under emulation
	python3 python3-venv                                              # zig + cargo-zigbuild (armv7, MIPS)
	make                                                              # the OpenWrt feed Makefile test
	shellcheck systemd prometheus                                     # packaging, ops (promtool)
	haproxy iperf3                                                    # the benchmark
	debootstrap                                                       # tests/fresh-machine.sh
	systemd-container                                                 # tests/systemd/boot.sh (systemd-nspawn)
)

have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

if ! $check_only; then
	need=()
	for pkg in "${packages[@]}"; do
		have "$pkg" || need+=("$pkg")
	done
	if [ "${#need[@]}" -gt 0 ]; then
		echo "setup: installing ${need[*]}"
		# Keep packaged daemons (haproxy, prometheus) from starting: the tests start what they need.
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
		trap 'rm -f /usr/sbin/policy-rc.d' EXIT
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
	fi

	# Rust itself comes from rustup (the README says so); without it the musl targets and the lint
	# components cannot be added, so say so here rather than fail later in a build.
	if ! command -v rustup >/dev/null 2>&1; then
		echo "setup: rustup not found on PATH; install Rust with rustup (https://rustup.rs), then rerun" >&2
		exit 1
	fi
	for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
		rustup target list --installed | grep -qx "$t" || rustup target add "$t"
	done
	for c in rustfmt clippy; do
		rustup component list --installed | grep -q "^$c" || rustup component add "$c"
	done
fi

# ---- checks: each tool does what we use it for; the message names the package that provides it
work=$(mktemp -d)
trap 'rm -rf "$work"; rm -f /usr/sbin/policy-rc.d' EXIT
fail() { # fail TOOL PACKAGE WHY
	echo "setup: FAIL: $1 does not work ($3); package: $2 (apt-get install $2)" >&2
	exit 1
}
works() { "$@" >"$work/out" 2>&1; }

# The headers ring includes (<string.h> pulls in bits/libc-header-start.h).
printf '#include <stdint.h>\n#include <string.h>\nint main(void){return (int)strlen("");}\n' >"$work/t.c"
works gcc -c "$work/t.c" -o "$work/t.o" || fail gcc "gcc libc6-dev" "cannot compile a one-line C file: $(head -c 300 "$work/out")"
printf '#include <vector>\nint main(){std::vector<int> v{1};return v[0]-1;}\n' >"$work/t.cc"
works c++ -c "$work/t.cc" -o "$work/tcc.o" || fail c++ g++ "cannot compile a one-line C++ file: $(head -c 300 "$work/out")"
works aarch64-linux-gnu-gcc -static "$work/t.c" -o "$work/t-aarch64" ||
	fail aarch64-linux-gnu-gcc "gcc-aarch64-linux-gnu libc6-dev-arm64-cross" "cannot compile and link a one-line C file: $(head -c 300 "$work/out")"
works qemu-aarch64-static "$work/t-aarch64" || fail qemu-aarch64-static qemu-user-static "cannot run a static aarch64 binary"
for q in qemu-arm-static qemu-mipsel-static qemu-mips-static; do
	works "$q" --version || fail "$q" qemu-user-static "--version failed"
done
works python3 -m venv --without-pip "$work/venv" || fail "python3 -m venv" python3-venv "cannot make a venv"
for t in iptables-nft iptables-legacy ip6tables-nft ip6tables-legacy; do
	works "$t" --version || fail "$t" iptables "--version failed"
done
works iptables-nft-restore --help || fail iptables-nft-restore iptables "--help failed"
works ip -V || fail ip iproute2 "-V failed"
works unshare --net true || fail "unshare --net" util-linux "cannot create a network namespace (root and CAP_SYS_ADMIN needed)"
for t in "socat -V:socat" "curl --version:curl" "ping -V:iputils-ping" "file --version:file" \
	"shellcheck --version:shellcheck" "promtool --version:prometheus" "systemd-analyze --version:systemd" \
	"haproxy -v:haproxy" "iperf3 --version:iperf3" "debootstrap --version:debootstrap" "pkill -V:procps" \
	"systemd-nspawn --version:systemd-container" "prometheus --version:prometheus" "make --version:make" "nft --version:nftables" \
	"setpriv --version:util-linux"; do
	cmd=${t%%:*}
	# shellcheck disable=SC2086 # the command and its flag, split on purpose
	works $cmd || fail "${cmd%% *}" "${t##*:}" "'$cmd' failed"
done
if ! $check_only || command -v rustup >/dev/null 2>&1; then
	for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
		rustup target list --installed | grep -qx "$t" || fail "rust-std for $t" "rustup target add $t" "not installed"
	done
	works cargo fmt --version || fail "cargo fmt" "rustup component add rustfmt" "missing"
	works cargo clippy --version || fail "cargo clippy" "rustup component add clippy" "missing"
fi
echo "setup: ok (every tool checked)"
