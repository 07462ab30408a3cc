#!/usr/bin/env bash
# Build static release binaries of edgeproxy for the musl targets, without docker.
#
#   cross/build.sh [--target TRIPLE]... [--out DIR]
#
# Targets (default: all three):
#   x86_64-unknown-linux-musl        stable, Debian gcc as CC for ring (.cargo/config.toml)
#   aarch64-unknown-linux-musl       stable, gcc-aarch64-linux-gnu as CC and linker (.cargo/config.toml)
#   armv7-unknown-linux-musleabihf   rustup has no rust-std for it here (404), so: nightly with
#                                    -Zbuild-std=std,panic_abort and cargo-zigbuild (zig supplies
#                                    CC, linker, crt and musl; hence -C link-self-contained=no)
#
# Installs what it needs itself (rustup targets and components, apt packages, a venv with ziglang
# and cargo-zigbuild under $EDGEPROXY_CACHE, default ~/.cache/edgeproxy), copies each binary to
# OUT/edgeproxy-TRIPLE (default target/dist) and prints its stripped size. Fails if the aarch64
# binary is 2.5 MiB or more. Run from anywhere; cargo runs from the repository root, where
# .cargo/config.toml is found.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cache=${EDGEPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeproxy}
out=""
targets=()
max_aarch64=$((5 * 1024 * 1024 / 2)) # 2.5 MiB

while [ $# -gt 0 ]; do
	case "$1" in
	--target) targets+=("${2:?--target needs a triple}"); shift 2 ;;
	--target=*) targets+=("${1#--target=}"); shift ;;
	--out) out=${2:?--out needs a directory}; shift 2 ;;
	-h | --help) sed -n '2,17p' "$0"; exit 0 ;;
	*) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)
target_dir=${CARGO_TARGET_DIR:-$root/target}
out=${out:-$target_dir/dist}
mkdir -p "$out"

log() { printf '== %s\n' "$*" >&2; }

apt_need() { # apt_need COMMAND PACKAGE...
	command -v "$1" >/dev/null 2>&1 && return 0
	local cmd=$1; shift
	apt_install "$cmd" "$@"
}

apt_install() { # apt_install WHAT PACKAGE...
	local what=$1; shift
	log "installing $* (for $what)"
	if [ "$(id -u)" -ne 0 ]; then echo "build.sh: $what missing; apt-get install $* (needs root)" >&2; exit 1; fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1 ||
		{ apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null; }
}

cc_works() { # cc_works CC PACKAGE...: CC compiles a one-line C file with the headers ring includes
	local cc=$1; shift
	local dir
	dir=$(mktemp -d)
	printf '#include <stdint.h>\n#include <string.h>\nint f(void){return (int)strlen("");}\n' >"$dir/t.c"
	if ! "$cc" -c "$dir/t.c" -o "$dir/t.o" >"$dir/err" 2>&1; then
		apt_install "$cc (its C headers)" "$@"
		"$cc" -c "$dir/t.c" -o "$dir/t.o" >"$dir/err" 2>&1 ||
			{ echo "build.sh: $cc cannot compile a one-line C file even after installing $*:" >&2; cat "$dir/err" >&2; rm -rf "$dir"; exit 1; }
	fi
	rm -rf "$dir"
}

rust_target() { # stable rust-std for a target rustup serves
	rustup target list --installed | grep -qx "$1" || { log "rustup target add $1"; rustup target add "$1"; }
}

zig_env() { # nightly + rust-src + a venv with ziglang and cargo-zigbuild; puts the venv on PATH
	if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
		log "rustup toolchain install nightly --profile minimal -c rust-src"
		rustup toolchain install nightly --profile minimal -c rust-src
	fi
	local venv=$cache/venv-zig
	if [ ! -x "$venv/bin/cargo-zigbuild" ] || [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m ziglang version >/dev/null 2>&1; then
		log "python venv with ziglang and cargo-zigbuild in $venv"
		apt_need python3 python3
		mkdir -p "$cache"
		python3 -m venv "$venv" 2>/dev/null || { apt_install "python3 -m venv" python3-venv; python3 -m venv "$venv"; }
		"$venv/bin/pip" install --quiet --disable-pip-version-check ziglang cargo-zigbuild
	fi
	export PATH="$venv/bin:$PATH"
}

build_one() {
	local t=$1
	case "$t" in
	x86_64-unknown-linux-musl)
		apt_need gcc gcc libc6-dev
		cc_works gcc gcc libc6-dev
		rust_target "$t"
		cargo build --release --locked --target "$t"
		;;
	aarch64-unknown-linux-musl)
		apt_need aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu libc6-dev-arm64-cross
		cc_works aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu libc6-dev-arm64-cross
		rust_target "$t"
		cargo build --release --locked --target "$t"
		;;
	armv7-unknown-linux-musleabihf)
		zig_env
		CARGO_TARGET_ARMV7_UNKNOWN_LINUX_MUSLEABIHF_RUSTFLAGS="-C link-self-contained=no" \
			cargo +nightly zigbuild --release --locked -Zbuild-std=std,panic_abort --target "$t"
		;;
	*) echo "build.sh: unsupported target $t" >&2; exit 2 ;;
	esac
	local bin=$target_dir/$t/release/edgeproxy
	cp "$bin" "$out/edgeproxy-$t"
	local size
	size=$(stat -c %s "$out/edgeproxy-$t")
	# The release profile strips (strip = true); say so if a symbol table survived.
	local stripped=stripped
	if command -v file >/dev/null 2>&1 && file "$out/edgeproxy-$t" | grep -q 'not stripped'; then stripped="NOT stripped"; fi
	printf 'size %-32s %9d B  %6.2f MiB  (%s)  %s\n' "$t" "$size" "$(awk -v s="$size" 'BEGIN { print s / 1048576 }')" "$stripped" "$out/edgeproxy-$t"
	if [ "$t" = aarch64-unknown-linux-musl ] && [ "$size" -ge "$max_aarch64" ]; then
		echo "build.sh: the aarch64 binary is $size B, over the 2.5 MiB budget ($max_aarch64 B)" >&2
		exit 1
	fi
}

for t in "${targets[@]}"; do
	log "building $t"
	build_one "$t"
done
