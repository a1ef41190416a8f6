#!/usr/bin/env bash
# Fuzzes every decoder of network and disk bytes (tests/fuzz): cargo-fuzz on
# the stable toolchain (--sanitizer none), each target for RUNS inputs, one
# after the other, starting from the committed corpus.
#
#   ./deploy/fuzz.sh                  # every target, 1,000,000 inputs each
#   ./deploy/fuzz.sh 100000 object    # some targets, fewer inputs
#
# Prints inputs and seconds per target and exits non-zero if any target
# crashed (panic, overflow, allocation over the cap): the input is then in
# tests/fuzz/harness/artifacts/<target>/. SHOAL_FUZZ_MERGE=1 also adds
# inputs that reached new code to the committed corpus (minimised, capped);
# SHOAL_FUZZ_NO_BUILD=1 runs what was built last.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-1000000}"
shift || true
harness=tests/fuzz/harness
corpus=tests/fuzz/corpus
# Instrumented: never the same target directory as the normal build.
target_dir="${SHOAL_FUZZ_TARGET_DIR:-$PWD/$harness/target}"
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(ls "$harness/fuzz_targets" | sed 's/\.rs$//')
fi
if [ "${SHOAL_FUZZ_NO_BUILD:-0}" != 1 ]; then
  command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
  cargo fuzz build --sanitizer none --fuzz-dir "$harness" --target-dir "$target_dir"
fi
bin="$target_dir/$(rustc -vV | sed -n 's/^host: //p')/release"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "$harness/artifacts/$t"
  log="$scratch/$t.log"
  start=$(date +%s)
  # New inputs go to the scratch directory; the committed corpus is read only.
  # Dictionaries: message field names and extreme lengths, config keys.
  dict="$harness/msgpack.dict"
  [ "$t" = config ] && dict="$harness/toml.dict"
  if "$bin/$t" "$scratch/$t" "$corpus/$t" -runs="$runs" -dict="$dict" -use_value_profile=1 \
      -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$harness/artifacts/$t/" >"$log" 2>&1; then
    done_line=$(grep -E '^Done [0-9]+ runs' "$log" | tail -1)
    echo "$t: ${done_line#Done } (wall $(( $(date +%s) - start )) s)"
  else
    echo "$t: CRASHED after $(( $(date +%s) - start )) s; log tail:"
    tail -n 30 "$log"
    failed+=("$t")
  fi
  if [ "${SHOAL_FUZZ_MERGE:-0}" = 1 ]; then
    # Minimise: keep the named inputs (seeds, crashes), then add the fewest
    # others that reach code they do not.
    kept="$scratch/$t.kept"
    mkdir -p "$kept"
    for f in "$corpus/$t"/*; do
      [[ "$(basename "$f")" =~ ^[0-9a-f]{40}$ ]] || cp "$f" "$kept/"
    done
    # Edges only (no hit counts), then at most 150 of the smallest found
    # inputs: the committed corpus stays a few kilobytes per target.
    "$bin/$t" -set_cover_merge=1 -use_counters=0 "$kept" "$corpus/$t" "$scratch/$t" \
      >/dev/null 2>&1
    rm -f "$corpus/$t"/*
    cp "$kept"/* "$corpus/$t/"
    ls -S "$corpus/$t" | grep -E '^[0-9a-f]{40}$' | head -n -150 | sed "s|^|$corpus/$t/|" |
      xargs -r rm
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "crashed: ${failed[*]} (inputs in $harness/artifacts/)"
  exit 1
fi
echo "no crash in ${#targets[@]} targets, $runs inputs each"
