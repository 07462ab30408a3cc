# shellcheck shell=bash
# Sourced by cross/build.sh and cross/test-32bit.sh: the toolchain of the build-std targets
# (armv7, mipsel, mips), pinned so that a build is reproducible, and the helpers that install it.
#
# The nightly: rustc 1.101.0-nightly (92b5b8c87 2026-10-29). zig 0.17.1 (the ziglang wheel)
# supplies CC, linker, crt and musl through cargo-zigbuild 0.24.1.
NIGHTLY=${EDGEPROXY_NIGHTLY:-nightly-2026-10-30}
ZIGLANG=0.17.1
CARGO_ZIGBUILD=0.24.1
cache=${EDGEPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeproxy}

log() { printf '== %s\n' "$*" >&2; }

apt_need() { # apt_need COMMAND PACKAGE...
	command -v "$1" >/dev/null 2>&1 && return 0
	local cmd=$1; shift
	apt_install "$cmd" "$@"
}

apt_install() { # apt_install WHAT PACKAGE...
	local what=$1; shift
	log "installing $* (for $what)"
	if [ "$(id -u)" -ne 0 ]; then echo "$(basename "$0"): $what missing; apt-get install $* (needs root)" >&2; exit 1; fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1 ||
		{ apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null; }
}

zig_env() { # the pinned nightly + rust-src + a venv with ziglang and cargo-zigbuild; puts the venv on PATH
	if ! rustup component list --toolchain "$NIGHTLY" --installed 2>/dev/null | grep -q '^rust-src'; then
		log "rustup toolchain install $NIGHTLY --profile minimal -c rust-src"
		rustup toolchain install "$NIGHTLY" --profile minimal -c rust-src
	fi
	local venv=$cache/venv-zig
	if [ ! -x "$venv/bin/cargo-zigbuild" ] || [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m ziglang version >/dev/null 2>&1 ||
		[ "$("$venv/bin/cargo-zigbuild" --version)" != "cargo-zigbuild $CARGO_ZIGBUILD" ]; then
		log "python venv with ziglang and cargo-zigbuild in $venv"
		apt_need python3 python3
		mkdir -p "$cache"
		python3 -m venv "$venv" 2>/dev/null || { apt_install "python3 -m venv" python3-venv; python3 -m venv "$venv"; }
		"$venv/bin/pip" install --quiet --disable-pip-version-check "ziglang==$ZIGLANG" "cargo-zigbuild==$CARGO_ZIGBUILD"
	fi
	export PATH="$venv/bin:$PATH"
}

