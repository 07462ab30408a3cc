#!/usr/bin/env bash
# Proves that CI passes on a brand-new machine: runs the whole of .ci/run, as root, inside a
# throwaway Debian 12 root made with debootstrap, from a clean clone of this checkout's HEAD with
# ../shared beside it; then runs plain `cargo test` there as an unprivileged user (the tests that
# need nothing must pass, the rest are reported as ignored, not failed).
#
#   sudo tests/fresh-machine.sh [--keep] [--user-only]
#
# --keep leaves the root in place; --user-only runs tests/setup.sh and then only the unprivileged
# `cargo test` (a quick check of that part, without the whole CI).
#
# The root holds less than a new machine of this project's kind does: Debian's minbase plus
# ca-certificates, git, gcc and python3 (the kind promises those), and the host's rustup
# toolchains laid over it read-only (the kind's one Rust toolchain, which cannot be fetched here;
# rustup may still add targets and components, into the throwaway layer). Everything else (cross
# compilers and their headers, qemu, iptables, promtool, zig, ...) must come from tests/setup.sh
# and cross/build.sh, as on a new machine. Cargo's registry and target directory start empty.
#
# Cost: the debootstrapped base is cached as a tarball under $EDGEPROXY_CACHE (default
# ~/.cache/edgeproxy/fresh-machine; ~1 min to make once); a run is then a cold CI: every apt
# install, every rustup download, every crate fetched and every target built from nothing
# (about 25-35 min on 2 cores). Not part of .ci/run for that reason; run it before closing an
# issue that touches setup. Needs root (debootstrap, mounts); network only to Debian's mirror,
# crates.io, PyPI and rustup's dist server, through the machine's own configuration. Touches no
# rule or address of the root namespace: the tests inside make their own namespaces, as in CI.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
keep=false
user_only=false
for a in "$@"; do
	case "$a" in
	--keep) keep=true ;;
	--user-only) user_only=true ;;
	*) echo "fresh-machine: unknown argument $a" >&2; exit 2 ;;
	esac
done
[ "$(id -u)" -eq 0 ] || { echo "fresh-machine: run as root (debootstrap, mounts)" >&2; exit 2; }
shared=$(cd "$repo/../shared" 2>/dev/null && pwd) || { echo "fresh-machine: no ../shared beside $repo" >&2; exit 2; }
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
if [ ! -d "$rustup_home/toolchains" ] || [ ! -x "$cargo_bin/rustup" ]; then
	echo "fresh-machine: no rustup toolchains in $rustup_home" >&2
	exit 2
fi
command -v debootstrap >/dev/null || { echo "fresh-machine: debootstrap missing (tests/setup.sh installs it)" >&2; exit 1; }

cache=${EDGEPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeproxy}/fresh-machine
base=$cache/bookworm-minbase.tar.gz
mkdir -p "$cache"
start=$(date +%s)
say() { printf '\n### fresh-machine: %s (at %ss)\n' "$*" "$(($(date +%s) - start))"; }

# The mirror apt already uses (these machines reach Debian only through it).
mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}

if [ ! -s "$base" ]; then
	say "debootstrap bookworm (minbase) from $mirror, cached as $base"
	tmp=$(mktemp -d "$cache/debootstrap.XXXXXX")
	debootstrap --variant=minbase --include=ca-certificates,git,gcc,python3 bookworm "$tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
		{ tail -20 "$cache/debootstrap.log" >&2; rm -rf "$tmp"; exit 1; }
	tar -C "$tmp" -czf "$base.part" . && mv "$base.part" "$base"
	rm -rf "$tmp"
fi

root=$(mktemp -d "$cache/root.XXXXXX")
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
	if $keep; then echo "fresh-machine: kept $root" >&2; else rm -rf "$root"; fi
}
trap cleanup EXIT
say "unpacking the base into $root"
tar -C "$root" -xzf "$base"
chmod 755 "$root" # it becomes /, which every user must enter (mktemp and the tarball say 700)
# What a new machine of this kind brings from its image, not from the project: DNS, apt's
# sources and settings (mirror, snapshot validity), pip's settings and the local trust anchors
# (registries may be reached through a TLS-inspecting egress whose CA the image trusts).
cp /etc/resolv.conf "$root/etc/resolv.conf"
if [ -d /etc/apt/sources.list.d ] && ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
	rm -f "$root/etc/apt/sources.list"
	cp -a /etc/apt/sources.list.d/*.sources "$root/etc/apt/sources.list.d/"
fi
for f in /etc/apt/apt.conf.d/99*; do [ -f "$f" ] && cp "$f" "$root/etc/apt/apt.conf.d/"; done
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
	cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
	chroot "$root" update-ca-certificates >/dev/null
fi
mkdir -p "$root/opt/rustup" "$root/opt/cargo/bin" "$root/work" "$root/layer/upper" "$root/layer/work"
cp -a "$cargo_bin/." "$root/opt/cargo/bin/"
git clone -q "$repo" "$root/work/main"
cp -a "$shared" "$root/work/shared"
chmod -R a-w "$root/work/shared"
chroot "$root" useradd -m -s /bin/bash newcomer
chroot "$root" chown -R newcomer: /work/main

cat >"$root/run-inside.sh" <<'INSIDE'
#!/bin/bash
# Runs inside the throwaway root: .ci/run as root, then plain cargo test as a normal user.
set -euo pipefail
export RUSTUP_HOME=/opt/rustup PATH=/opt/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
cd /work/main
if [ "${USER_ONLY:-false}" = true ]; then
	echo "### inside: tests/setup.sh as root (--user-only)"
	HOME=/root CARGO_HOME=/root/.cargo tests/setup.sh </dev/null
else
	echo "### inside: .ci/run as root"
	HOME=/root CARGO_HOME=/root/.cargo CI=true bash .ci/run </dev/null
fi
echo "### inside: cargo test as an unprivileged user (only the tests that need nothing)"
su newcomer -s /bin/bash -c 'export RUSTUP_HOME=/opt/rustup CARGO_HOME=$HOME/.cargo PATH=/opt/cargo/bin:/usr/bin:/bin; cd /work/main && cargo test --locked 2>&1' | tee /tmp/newcomer.log | grep -E '^test result|^error|FAILED|panicked' || true
grep -q '^test result: FAILED' /tmp/newcomer.log && { echo "### inside: cargo test as a user FAILED"; exit 1; }
grep -q '^test result: ok' /tmp/newcomer.log || { echo "### inside: cargo test as a user ran nothing"; exit 1; }
awk '/^test result/ { p += $4; i += $8 } END { printf "### inside: as a user: %d passed, %d ignored (need root or tools)\n", p, i }' /tmp/newcomer.log
INSIDE
chmod 755 "$root/run-inside.sh"

say "running .ci/run inside the root (a private mount namespace; the host's network)"
rc=0
# The inner script runs in the new namespace; its variables are its own (hence single quotes).
# shellcheck disable=SC2016
unshare --mount --propagation private --fork bash -euo pipefail -c '
	r=$1 rustup_home=$2
	# The root must be a mount point: `ip netns exec` remounts / as a slave.
	mount --bind "$r" "$r"
	mount -t proc proc "$r/proc"
	mount -t sysfs sysfs "$r/sys"
	# A machine has its cgroup hierarchy mounted; systemd-nspawn (the systemd boot test) reads it.
	mount --rbind /sys/fs/cgroup "$r/sys/fs/cgroup"
	mount --rbind /dev "$r/dev"
	mount -t tmpfs -o mode=755 tmpfs "$r/run"
	mkdir -p "$r/lib/modules" && [ -d /lib/modules ] && mount --bind -o ro /lib/modules "$r/lib/modules"
	mount -t overlay overlay -o "lowerdir=$rustup_home,upperdir=$r/layer/upper,workdir=$r/layer/work" "$r/opt/rustup"
	chmod 755 "$r/opt/rustup"
	exec chroot "$r" env USER_ONLY="$3" /run-inside.sh
' fresh "$root" "$rustup_home" "$user_only" || rc=$?
say "finished with exit code $rc"
exit "$rc"
