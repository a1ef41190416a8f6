#!/usr/bin/env bash
# Runs every test: unit and property tests, the simulated cluster, and real
# `shoal` processes on loopback. `./deploy/test.sh [extra cargo test args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh
start=$(date +%s)
cargo build --locked --workspace --all-targets
cargo test --locked --workspace "$@"
echo "build and tests took $(( $(date +%s) - start )) s"
