#!/usr/bin/env bash
# Builds Shoal, puts `shoal` on the PATH (cargo's bin directory) and starts a
# local cluster in the foreground: `./deploy/dev.sh [--nodes N]`.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh
cargo build --locked -p shoal-node --bin shoal
bin_dir="${CARGO_HOME:-$HOME/.cargo}/bin"
mkdir -p "$bin_dir"
install -m 755 "${CARGO_TARGET_DIR:-target}/debug/shoal" "$bin_dir/shoal"
echo "installed $bin_dir/shoal"
exec "$bin_dir/shoal" dev "$@"
