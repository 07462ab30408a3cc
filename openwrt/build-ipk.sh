#!/usr/bin/env bash
# Build an installable OpenWrt .ipk (opkg format) from a static edgeproxy binary, without the SDK.
#
#   openwrt/build-ipk.sh BINARY OUTDIR [ARCH]
#
# ARCH is the opkg architecture of the target device (`opkg print-architecture`), e.g.
# aarch64_cortex-a53, aarch64_generic, arm_cortex-a7_neon-vfpv4, x86_64. Without it the script
# guesses from the ELF header (x86_64, aarch64_generic, arm_cortex-a7_neon-vfpv4) and says so;
# opkg refuses a package whose Architecture the device does not list.
#
# The package: an outer gzip'ed tar of ./debian-binary ("2.0"), ./data.tar.gz and
# ./control.tar.gz (control, conffiles, postinst, prerm), all owned by root, with reproducible
# timestamps (SOURCE_DATE_EPOCH, default: the last commit's time). Prints the .ipk's path.
# The control file's Require-User is the feed Makefile's USERID: OpenWrt's default_postinst
# creates that user and group, as for a package built with the SDK.
# opkg is the package manager of OpenWrt up to 24.10 (25.x moved to apk).
set -euo pipefail

usage() { sed -n '2,9p' "$0" >&2; exit 2; }
if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage; fi
bin=$1
outdir=$2
arch=${3:-}

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
files=$here/edgeproxy/files

[ -f "$bin" ] || { echo "build-ipk.sh: $bin: no such file" >&2; exit 1; }
[ -x "$bin" ] || { echo "build-ipk.sh: $bin: not executable" >&2; exit 1; }
magic=$(head -c 4 "$bin" | od -An -tx1 | tr -d ' \n')
[ "$magic" = 7f454c46 ] || { echo "build-ipk.sh: $bin: not an ELF binary" >&2; exit 1; }

if [ -z "$arch" ]; then
	# e_machine: 2 bytes at offset 18 (little endian on all our targets).
	machine=$(od -An -tu2 -j18 -N2 "$bin" | tr -d ' ')
	case "$machine" in
	62) arch=x86_64 ;;
	183) arch=aarch64_generic ;;
	40) arch=arm_cortex-a7_neon-vfpv4 ;;
	*) echo "build-ipk.sh: $bin: unknown ELF machine $machine; give ARCH" >&2; exit 1 ;;
	esac
	echo "build-ipk.sh: no ARCH given; guessed $arch from the binary (check: opkg print-architecture)" >&2
fi
case "$arch" in
*[!A-Za-z0-9_.+-]* | "") echo "build-ipk.sh: $arch: not a valid architecture name" >&2; exit 1 ;;
esac

version=${EDGEPROXY_VERSION:-$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)}
release=$(sed -n 's/^PKG_RELEASE:=//p' "$here/edgeproxy/Makefile")
if [ -z "$version" ] || [ -z "$release" ]; then echo "build-ipk.sh: cannot read the version" >&2; exit 1; fi
userid=$(sed -n 's/^[[:space:]]*USERID:=//p' "$here/edgeproxy/Makefile")
[ -n "$userid" ] || { echo "build-ipk.sh: cannot read USERID from the Makefile" >&2; exit 1; }
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data=$work/data
ctrl=$work/control
mkdir -p "$data/usr/sbin" "$data/etc/init.d" "$data/etc/config" "$data/etc/capabilities" "$ctrl"
install -m 0755 "$bin" "$data/usr/sbin/edgeproxy"
install -m 0755 "$files/edgeproxy.init" "$data/etc/init.d/edgeproxy"
install -m 0600 "$files/edgeproxy.config" "$data/etc/config/edgeproxy"
install -m 0644 "$files/edgeproxy.capabilities" "$data/etc/capabilities/edgeproxy.json"

size=$(find "$data" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
cat >"$ctrl/control" <<CONTROL
Package: edgeproxy
Version: $version-$release
Depends: nftables-json, kmod-nft-nat
Source: openwrt/edgeproxy
SourceName: edgeproxy
License: Apache-2.0
Section: net
Priority: optional
Maintainer: edgeproxy maintainers
Architecture: $arch
Installed-Size: $size
Require-User: $userid
Description: Kubernetes ClusterIP Services for edge machines (EdgeMesh-compatible).
 A static edgeproxy binary: lists Services and endpoints from the API server or KubeEdge's
 MetaServer, installs nat rules with nft (ahead of any kube-proxy) and proxies TCP and UDP to the endpoints.
CONTROL
printf '/etc/config/edgeproxy\n' >"$ctrl/conffiles"
# OpenWrt's own maintainer scripts: create the user of Require-User and enable and start the
# init script on install, stop and disable it on removal (stopping runs service_stopped, which
# removes the rules).
cat >"$ctrl/postinst" <<'SCRIPT'
#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s "${IPKG_INSTROOT}/lib/functions.sh" ] || exit 0
. "${IPKG_INSTROOT}/lib/functions.sh"
default_postinst "$0" "$@"
SCRIPT
cat >"$ctrl/prerm" <<'SCRIPT'
#!/bin/sh
[ -s "${IPKG_INSTROOT}/lib/functions.sh" ] || exit 0
. "${IPKG_INSTROOT}/lib/functions.sh"
default_prerm "$0" "$@"
SCRIPT
chmod 0755 "$ctrl/postinst" "$ctrl/prerm"
chmod 0644 "$ctrl/control" "$ctrl/conffiles"
printf '2.0\n' >"$work/debian-binary"

tarc() { # tarc DIR OUT MEMBERS...: deterministic, root-owned tar.gz
	local dir=$1 out=$2
	shift 2
	(cd "$dir" && tar --format=gnu --sort=name --owner=0 --group=0 --numeric-owner \
		--mtime="@$epoch" -cf - "$@") | gzip -n9 >"$out"
}
tarc "$data" "$work/data.tar.gz" .
tarc "$ctrl" "$work/control.tar.gz" .
mkdir -p "$outdir"
ipk=$outdir/edgeproxy_${version}-${release}_${arch}.ipk
(cd "$work" && tar --format=gnu --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
	-cf - ./debian-binary ./data.tar.gz ./control.tar.gz) | gzip -n9 >"$ipk"
echo "$ipk"
