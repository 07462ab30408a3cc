#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmarks need on Debian 12, as root. Idempotent:
# packages already present are not reinstalled. Services that packages would start are not started.
set -euo pipefail

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# iptables/iproute2/socat/curl/ping: namespace tests, the demo; qemu + cross gcc + python3-venv (zig
# for armv7) + file: cross/; shellcheck, systemd (systemd-analyze), prometheus (promtool), tar,
# gzip: the packaging and ops tests; haproxy, iperf3: the benchmark.
for pkg in iptables iproute2 iputils-ping socat curl procps psmisc util-linux file tar gzip \
           qemu-user-static gcc gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf \
           haproxy iperf3 shellcheck prometheus systemd python3-venv; do
  have "$pkg" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  # Keep packaged daemons (haproxy, prometheus) from starting: the tests start what they need.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
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
echo "setup: ok"
