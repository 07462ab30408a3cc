#!/usr/bin/env bash
# Install the tools the tests and cross scripts call, when missing (Debian/Ubuntu, as root):
# ShellCheck, systemd-analyze/systemd-tmpfiles, promtool, qemu-user-static, the aarch64 and armhf
# cross gcc, python3-venv (zig for armv7), GNU tar/gzip, iptables and iproute2.
# One `apt-get update` at most, and only when something is missing.
set -euo pipefail

need=()
want() { # want COMMAND PACKAGE
	command -v "$1" >/dev/null 2>&1 || need+=("$2")
}
want shellcheck shellcheck
want systemd-analyze systemd
want systemd-tmpfiles systemd
want promtool prometheus
want qemu-aarch64-static qemu-user-static
want qemu-arm-static qemu-user-static
want aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu
want arm-linux-gnueabihf-gcc gcc-arm-linux-gnueabihf
want gcc gcc
want tar tar
want gzip gzip
want iptables iptables
want ip iproute2
want file file
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if [ ${#need[@]} -eq 0 ]; then
	echo "setup-test-deps: everything is installed"
	exit 0
fi
# Unique package names, in order.
mapfile -t pkgs < <(printf '%s\n' "${need[@]}" | awk '!seen[$0]++')
echo "setup-test-deps: installing ${pkgs[*]}"
if [ "$(id -u)" -ne 0 ]; then
	echo "setup-test-deps: need root for apt-get install ${pkgs[*]}" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends: the prometheus package would otherwise pull in its web assets.
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
