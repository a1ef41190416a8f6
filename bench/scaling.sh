#!/usr/bin/env bash
# The scaling tables of bench/README.md: a local 3-node Shoal cluster
# (N=3, R=W=2), workload a (50% reads, 50% updates), closed loop, with one
# setting varied at a time from 100-byte values, 100,000 records and 64
# workers:
#   - value size 100 B .. 1 MiB (fewer records for large values, so the
#     data set stays about 1 GiB at most; throughput also in MB/s),
#   - records 100,000 .. RECORDS_MAX (data larger than the caches),
#   - concurrency 1 .. 1,024 workers.
# Prints Markdown tables with CPU per operation; reports go to $OUT.
#
#   bench/scaling.sh                    # DUR=20s OUT=bench-scaling RECORDS_MAX=1000000
#   DUR=10s TABLES="concurrency" bench/scaling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${DUR:-20s}
OUT=${OUT:-bench-scaling}
RECORDS_MAX=${RECORDS_MAX:-1000000}
TABLES=${TABLES:-"values records concurrency"}
./deploy/setup.sh
cargo build --release -p shoal-bench -p shoal-node
BENCH="${CARGO_TARGET_DIR:-target}/release/shoal-bench"

run() { # name args...
    local name=$1
    shift
    echo "== $name" >&2
    "$BENCH" --local 3 --workload a --duration "$DUR" --out "$OUT/$name" "$@" 2>/dev/null >&2
}

for table in $TABLES; do
    case $table in
        values)
            for spec in 100:100000 1024:100000 10240:50000 102400:5000 1048576:500; do
                run "values-${spec%%:*}" --value-size "${spec%%:*}" --records "${spec##*:}"
            done ;;
        records)
            r=100000
            while [ "$r" -le "$RECORDS_MAX" ]; do
                run "records-$r" --records "$r"
                r=$((r * 10))
            done ;;
        concurrency)
            for c in 1 4 16 64 256 1024; do
                run "concurrency-$c" -c "$c"
            done ;;
    esac
done

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    path = f"{out}/{name}/report.json"
    return json.load(open(path)) if os.path.exists(path) else None
def figures(r):
    ops = r["ops"]
    count = sum(o["count"] for o in ops.values())
    worst = lambda k: max(o[k] for o in ops.values())
    cpu = r.get("cpu") or {}
    return count / r["elapsed_secs"], worst("p50_ms"), worst("p99_ms"), worst("p999_ms"), \
        sum(o["errors"] for o in ops.values()), cpu.get("servers_us_per_op") or 0, cpu.get("machine_us_per_op") or 0
names = sorted(os.listdir(out)) if os.path.isdir(out) else []
for table, key, head in [("values", "value_size", "value size"), ("records", "records", "records"),
                         ("concurrency", "concurrency", "workers")]:
    rows = [(n, load(n)) for n in names if n.startswith(table + "-")]
    rows = sorted((r["settings"][key]["min"] if key == "value_size" else r["settings"][key], r) for n, r in rows if r)
    if not rows:
        continue
    print(f"\n| {head} | records | ops/s | MB/s | p50 ms | p99 ms | p99.9 ms | errors | servers us/op | machine us/op |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v, r in rows:
        ops, p50, p99, p999, errors, servers, machine = figures(r)
        size = r["settings"]["value_size"]["min"]
        print(f"| {v:,} | {r['settings']['records']:,} | {ops:,.0f} | {ops * size / 1e6:.1f} | {p50:.3f} | {p99:.3f} | "
              f"{p999:.3f} | {errors} | {servers:.1f} | {machine:.1f} |")
PY
