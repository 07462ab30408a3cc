#!/usr/bin/env bash
# Build static release binaries of edgeproxy for the musl targets, without docker.
#
#   cross/build.sh [--target TRIPLE]... [--out DIR]
#
# Targets (default: all five):
#   x86_64-unknown-linux-musl        stable, Debian gcc as CC for ring (.cargo/config.toml)
#   aarch64-unknown-linux-musl       stable, gcc-aarch64-linux-gnu as CC and linker (.cargo/config.toml)
#   armv7-unknown-linux-musleabihf   rustup has no rust-std for it here (404), so: a pinned nightly
#   mipsel-unknown-linux-musl        ($NIGHTLY below) with -Zbuild-std=std,panic_abort and
#   mips-unknown-linux-musl          cargo-zigbuild (zig supplies CC, linker, crt and musl; hence
#                                    -C link-self-contained=no). The MIPS targets are tier 3:
#                                    no rust-std exists for them at all.
#
# Installs what it needs itself (rustup targets and components, apt packages, a venv with ziglang
# and cargo-zigbuild under $EDGEPROXY_CACHE, default ~/.cache/edgeproxy), copies each binary to
# OUT/edgeproxy-TRIPLE (default target/dist) and prints its stripped size. Fails if the aarch64
# or a MIPS binary is 2.5 MiB or more. Run from anywhere; cargo runs from the repository root, where
# .cargo/config.toml is found.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=cross/toolchain.sh
. cross/toolchain.sh
out=""
targets=()
max_size=$((5 * 1024 * 1024 / 2)) # 2.5 MiB, for aarch64 and MIPS

while [ $# -gt 0 ]; do
	case "$1" in
	--target) targets+=("${2:?--target needs a triple}"); shift 2 ;;
	--target=*) targets+=("${1#--target=}"); shift ;;
	--out) out=${2:?--out needs a directory}; shift 2 ;;
	-h | --help) sed -n '2,19p' "$0"; exit 0 ;;
	*) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf mipsel-unknown-linux-musl mips-unknown-linux-musl)
target_dir=${CARGO_TARGET_DIR:-$root/target}
out=${out:-$target_dir/dist}
mkdir -p "$out"

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
	armv7-unknown-linux-musleabihf | mipsel-unknown-linux-musl | mips-unknown-linux-musl)
		zig_env
		local upper flags=(-C link-self-contained=no) std_features=()
		upper=$(tr 'a-z-' 'A-Z_' <<<"$t")
		if [[ $t == mips* ]]; then
			# MIPS code is bulky, and position-independent MIPS code more so (every call through
			# the GOT): a plain static executable, std built for size, and a panic aborts at once,
			# without a message (the agent never panics by design; procd respawns it, and the
			# same code prints its panics on every other target). 3.40 MB -> 2.4 MB on mipsel.
			flags+=(-C relocation-model=static -Zlocation-detail=none -Zunstable-options -Cpanic=immediate-abort)
			std_features=(-Zbuild-std-features=optimize_for_size)
		fi
		env "CARGO_TARGET_${upper}_RUSTFLAGS=${flags[*]}" \
			cargo "+$NIGHTLY" zigbuild --release --locked -Zbuild-std=std,panic_abort "${std_features[@]}" --target "$t"
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
	if [[ $t == aarch64-* || $t == mips* ]] && [ "$size" -ge "$max_size" ]; then
		echo "build.sh: the $t binary is $size B, over the 2.5 MiB budget ($max_size B)" >&2
		exit 1
	fi
}

for t in "${targets[@]}"; do
	log "building $t"
	build_one "$t"
done
