#!/usr/bin/env bash
# Run every fuzz target for a bounded time (libFuzzer through cargo-fuzz, AddressSanitizer).
#
#   fuzz/run.sh [SECONDS] [TARGET...]     default 30 s each, every target; CI runs `fuzz/run.sh 30`
#   fuzz/run.sh 3600 decode_render        one target for an hour
#
# Corpora live under $EDGEPROXY_CACHE/fuzz-corpus/TARGET (default ~/.cache/edgeproxy), grow
# from run to run on the same machine, and are seeded each time from fuzz/seeds/TARGET (the
# probes: injection names, loops, special addresses, YAML bombs, absurd config) and from the real
# captures in ../shared/fixtures (lists for decode_render, watch lines for watch_line and
# line_splitter, the sample configs for config). A crash or a failed property stops the run with
# a non-zero exit; the input that did it is kept in fuzz/artifacts/TARGET/ (reproduce with
# `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/<file>`).
#
# Installs what it needs: the nightly toolchain (minimal profile) and cargo-fuzz (crates.io).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
secs=${1:-30}
shift || true
all=(decode_render watch_line line_splitter kubeconfig config ops_request)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
cache=${EDGEPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeproxy}
fixtures=${EDGEPROXY_FIXTURES:-$repo/../shared/fixtures/monitoring-cluster}
log() { printf '== fuzz: %s\n' "$*" >&2; }

rustup toolchain list | grep -q '^nightly' || { log "rustup toolchain install nightly"; rustup toolchain install nightly --profile minimal; }
command -v cargo-fuzz >/dev/null 2>&1 || { log "cargo install cargo-fuzz"; cargo install --locked cargo-fuzz; }
[ -d "$fixtures" ] || { echo "fuzz: no fixtures at $fixtures (set EDGEPROXY_FIXTURES)" >&2; exit 2; }
command -v c++ >/dev/null 2>&1 || { echo "fuzz: no C++ compiler for libFuzzer; apt-get install g++ (tests/setup.sh does)" >&2; exit 1; }

seed() { # seed TARGET DIR: the committed seeds and the captures that fit the target
	local t=$1 dir=$2 f i=0
	mkdir -p "$dir"
	cp "$here/seeds/$t/"* "$dir/" 2>/dev/null || true
	case "$t" in
	decode_render)
		for f in "$fixtures"/*.json; do cp "$f" "$dir/fixture-$(basename "$f")"; done ;;
	watch_line | line_splitter)
		for f in "$fixtures"/*.jsonl; do
			while IFS= read -r line && [ $i -lt 200 ]; do
				i=$((i + 1))
				if [ "$t" = watch_line ]; then printf '%s' "$line" >"$dir/fixture-line-$i"; fi
			done <"$f"
			# The splitter gets whole streams, behind a first byte that picks cap and chunking.
			if [ "$t" = line_splitter ]; then { printf '\x41'; head -c 60000 "$f"; } >"$dir/fixture-$(basename "$f")"; fi
		done ;;
	config)
		cp "$repo/systemd/config.json" "$dir/systemd-config.json" ;;
	esac
}

cd "$here"
log "building the targets (nightly, AddressSanitizer)"
cargo +nightly fuzz build >&2
failed=()
for t in "${targets[@]}"; do
	corpus=$cache/fuzz-corpus/$t
	seed "$t" "$corpus"
	mkdir -p "$here/artifacts/$t"
	log "$t for ${secs}s ($(find "$corpus" -type f | wc -l) inputs in the corpus)"
	if ! cargo +nightly fuzz run "$t" "$corpus" -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
		-max_len=1048576 -artifact_prefix="$here/artifacts/$t/" -print_final_stats=1 >"$cache/fuzz-$t.log" 2>&1; then
		tail -40 "$cache/fuzz-$t.log" >&2
		failed+=("$t")
		continue
	fi
	grep -E '^stat::number_of_executed_units|^Done [0-9]+ runs' "$cache/fuzz-$t.log" | tail -2 | sed "s/^/   $t: /" >&2
done
if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
	exit 1
fi
log "every target ran ${secs}s without a crash"
