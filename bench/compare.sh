#!/usr/bin/env bash
# The comparison of bench/README.md: Shoal (3 local nodes, N=3, R=W=2),
# Redis (one server, no persistence) and etcd (3 members), workloads a, b
# and c with 100-byte values over 100,000 records, closed loop (64 workers)
# and open loop (RATE ops/s, 256 workers). Everything runs on loopback and
# is stopped on exit. Prints a Markdown table; reports go to $OUT.
#
#   bench/compare.sh                 # DUR=30s RATE=10000 OUT=bench-compare
#   DUR=10s WORKLOADS="a" bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${DUR:-30s}
RATE=${RATE:-10000}
OUT=${OUT:-bench-compare}
WORKLOADS=${WORKLOADS:-"a b c"}
TARGETS=${TARGETS:-"shoal redis etcd"}

need() {
    command -v "$1" >/dev/null && return
    if [ "$(id -u)" = 0 ]; then apt-get install -y "$2" >/dev/null; else
        echo "install $2 (apt-get install $2) first" >&2; exit 1; fi
}
need redis-server redis-server
need etcd etcd-server
./deploy/setup.sh
cargo build --release -p shoal-bench -p shoal-node
BENCH=target/release/shoal-bench

WORK=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

redis-server --port 16379 --save '' --appendonly no --daemonize no >"$WORK/redis.log" 2>&1 &
pids+=($!)
cluster="m1=http://127.0.0.1:12380,m2=http://127.0.0.1:22380,m3=http://127.0.0.1:32380"
for m in 1 2 3; do
    etcd --name m$m --data-dir "$WORK/etcd$m" \
        --listen-client-urls http://127.0.0.1:${m}2379 --advertise-client-urls http://127.0.0.1:${m}2379 \
        --listen-peer-urls http://127.0.0.1:${m}2380 --initial-advertise-peer-urls http://127.0.0.1:${m}2380 \
        --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token shoal-bench \
        >"$WORK/etcd$m.log" 2>&1 &
    pids+=($!)
done
sleep 3

for t in $TARGETS; do
    case $t in
        shoal) where=(--local 3 -r 2 -w 2) ;;
        redis) where=(--target redis://127.0.0.1:16379) ;;
        etcd) where=(--target etcd://127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379) ;;
    esac
    for w in $WORKLOADS; do
        echo "== $t workload $w closed loop" >&2
        "$BENCH" "${where[@]}" --workload "$w" --duration "$DUR" -c 64 --out "$OUT/$t-$w-closed" 2>/dev/null >&2
        echo "== $t workload $w open loop at $RATE/s" >&2
        "$BENCH" "${where[@]}" --workload "$w" --duration "$DUR" -c 256 --rate "$RATE" --out "$OUT/$t-$w-open" 2>/dev/null >&2
    done
done

python3 - "$OUT" $TARGETS -- $WORKLOADS <<'PY'
import json, sys
out = sys.argv[1]
i = sys.argv.index("--")
targets, workloads = sys.argv[2:i], sys.argv[i + 1:]
print("| target | workload | mode | ops/s | p50 ms | p99 ms | p99.9 ms | errors | note |")
print("|---|---|---|---:|---:|---:|---:|---:|---|")
for t in targets:
    for w in workloads:
        for mode in ("closed", "open"):
            r = json.load(open(f"{out}/{t}-{w}-{mode}/report.json"))
            ops = r["ops"]
            count = sum(o["count"] for o in ops.values())
            errors = sum(o["errors"] for o in ops.values())
            worst = lambda k: max(o[k] for o in ops.values())
            note = "fell behind" if r["fell_behind"] else ""
            label = "closed, 64 workers" if mode == "closed" else f"open, {r['settings']['rate']:.0f}/s"
            print(f"| {t} | {w} | {label} | {count / r['elapsed_secs']:.0f} | {worst('p50_ms'):.3f} | "
                  f"{worst('p99_ms'):.3f} | {worst('p999_ms'):.3f} | {errors} | {note} |")
PY
