#!/usr/bin/env bash
# The comparison of bench/README.md: Shoal (3 local nodes, N=3, R=W=2),
# Redis (one server, no persistence) and etcd (3 members), workloads a, b
# and c with 100-byte values over 100,000 records, closed loop (64 workers)
# and open loop (RATE ops/s, 256 workers); durable writes (workload w,
# Shoal with fsync = true, etcd which always syncs); then, unless SWEEP=0,
# an open-loop rate sweep of each target and one latency-throughput PNG.
# Everything runs on loopback and is stopped on exit. Prints a Markdown
# table with CPU per operation (servers and whole machine); reports go to $OUT.
#
#   bench/compare.sh                 # DUR=60s RATE=10000 OUT=bench-compare
#   DUR=10s WORKLOADS="a" SWEEP=0 bench/compare.sh
#   HUGE_PAGES=0 bench/compare.sh    # no huge pages reserved for the run
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${DUR:-60s}
RATE=${RATE:-10000}
OUT=${OUT:-bench-compare}
WORKLOADS=${WORKLOADS:-"a b c"}
TARGETS=${TARGETS:-"shoal redis etcd"}
# SHOAL_BEFORE=path/to/an/older/shoal adds the target shoal-before: that
# binary's nodes, measured in the same run (a before/after table).
if [ -n "${SHOAL_BEFORE:-}" ] && [[ " $TARGETS " != *" shoal-before "* ]]; then
    TARGETS="shoal-before $TARGETS"
fi
SWEEP=${SWEEP:-1}
STEP_DUR=${STEP_DUR:-10s}

need() {
    command -v "$1" >/dev/null && return
    if [ "$(id -u)" = 0 ]; then apt-get install -y "$2" >/dev/null; else
        echo "install $2 (apt-get install $2) first" >&2; exit 1; fi
}
need redis-server redis-server
need etcd etcd-server
./deploy/setup.sh
cargo build --release -p shoal-bench -p shoal-node
BENCH="${CARGO_TARGET_DIR:-target}/release/shoal-bench"

WORK=$(mktemp -d)
# Each target's servers run during its own cells only: the idle members of
# another (etcd's heartbeats, its Go runtime) would take turns on the same
# two cores and be counted in the machine's CPU per operation.
servers=()
up() {
    case $1 in
        redis)
            redis-server --port 16379 --save '' --appendonly no --daemonize no >>"$WORK/redis.log" 2>&1 &
            servers+=($!) ;;
        etcd)
            rm -rf "$WORK"/etcd?
            local cluster="m1=http://127.0.0.1:12380,m2=http://127.0.0.1:22380,m3=http://127.0.0.1:32380"
            for m in 1 2 3; do
                etcd --name m$m --data-dir "$WORK/etcd$m" \
                    --listen-client-urls http://127.0.0.1:${m}2379 --advertise-client-urls http://127.0.0.1:${m}2379 \
                    --listen-peer-urls http://127.0.0.1:${m}2380 --initial-advertise-peer-urls http://127.0.0.1:${m}2380 \
                    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token shoal-bench \
                    >>"$WORK/etcd$m.log" 2>&1 &
                servers+=($!)
            done ;;
        *) return 0 ;;
    esac
    # Until it answers (etcd: every member healthy, a leader elected), at
    # most 30 s.
    python3 - "$1" <<'PY' || { tail -n 20 "$WORK"/*.log >&2; echo "$1 did not start" >&2; exit 1; }
import json, socket, sys, time, urllib.request
def up(target):
    try:
        if target == "redis":
            with socket.create_connection(("127.0.0.1", 16379), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        for m in (1, 2, 3):
            with urllib.request.urlopen(f"http://127.0.0.1:{m}2379/health", timeout=1) as r:
                if json.load(r).get("health") != "true":
                    return False
        return True
    except (OSError, ValueError):  # not up yet, or not answering JSON yet
        return False
deadline = time.monotonic() + 30
while not up(sys.argv[1]):
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.2)
PY
}
down() {
    for p in "${servers[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${servers[@]}"; do wait "$p" 2>/dev/null || true; done
    servers=()
}
# Shoal's deployment as the README advises it: memtables on reserved huge
# pages (`shoal dev` nodes use them where safe). As root, with none
# reserved, the run reserves HUGE_PAGES of 2 MiB (256: 64 per node and
# room to spare; not where the default size is another) and gives them
# back at the end; HUGE_PAGES=0 leaves the machine as it is. Redis and
# etcd do not use them.
HUGE_PAGES=${HUGE_PAGES:-256}
hugepages_before=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
if [ "$(id -u)" = 0 ] && [ "$hugepages_before" = 0 ] && [ "$HUGE_PAGES" != 0 ] &&
    grep -q '^Hugepagesize: *2048 kB' /proc/meminfo; then
    echo "$HUGE_PAGES" > /proc/sys/vm/nr_hugepages || true
fi
cleanup() {
    down; rm -rf "$WORK"
    if [ "$(cat /proc/sys/vm/nr_hugepages 2>/dev/null)" != "$hugepages_before" ]; then
        echo "$hugepages_before" > /proc/sys/vm/nr_hugepages || true
    fi
}
trap cleanup EXIT

where() {
    run=(env)
    case $1 in
        shoal) where=(--local 3 -r 2 -w 2) ;;
        shoal-before) where=(--local 3 -r 2 -w 2); run=(env "SHOAL_BIN=$SHOAL_BEFORE") ;;
        redis) where=(--target redis://127.0.0.1:16379 --server-process redis-server) ;;
        etcd) where=(--target etcd://127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379 --server-process etcd) ;;
    esac
}
for t in $TARGETS; do
    where "$t"
    up "$t"
    for w in $WORKLOADS; do
        echo "== $t workload $w closed loop" >&2
        "${run[@]}" "$BENCH" "${where[@]}" --workload "$w" --duration "$DUR" -c 64 --out "$OUT/$t-$w-closed" 2>/dev/null >&2
        echo "== $t workload $w open loop at $RATE/s" >&2
        "${run[@]}" "$BENCH" "${where[@]}" --workload "$w" --duration "$DUR" -c 256 --rate "$RATE" --out "$OUT/$t-$w-open" 2>/dev/null >&2
    done
    # Durable writes: every acknowledged write is on disk (Redis here keeps none).
    case $t in
        shoal | shoal-before) durable=(--fsync) ;;
        etcd) durable=() ;;
        *) down; continue ;;
    esac
    echo "== $t workload w closed loop, durable" >&2
    "${run[@]}" "$BENCH" "${where[@]}" "${durable[@]}" --workload w --duration "$DUR" -c 64 --out "$OUT/$t-w-durable" 2>/dev/null >&2
    down
done

if [ "$SWEEP" != 0 ]; then
    curves=()
    for t in $TARGETS; do
        where "$t"
        case $t in
            shoal | shoal-before) rates=2000:2000 ;;
            redis) rates=5000:5000 ;;
            etcd) rates=500:500 ;;
        esac
        echo "== $t rate sweep from ${rates%%:*} ops/s in steps of ${rates##*:}" >&2
        up "$t"
        "${run[@]}" "$BENCH" "${where[@]}" --workload a --sweep "$rates" --duration "$STEP_DUR" -c 256 --out "$OUT/$t-sweep" 2>/dev/null >&2
        down
        curves+=("$(echo "$t" | tr a-z A-Z)=$OUT/$t-sweep")
    done
    (IFS=,; "$BENCH" --curves "${curves[*]}" --out "$OUT" >&2)
fi

python3 - "$OUT" $TARGETS -- $WORKLOADS <<'PY'
import json, os, sys
out = sys.argv[1]
i = sys.argv.index("--")
targets, workloads = sys.argv[2:i], sys.argv[i + 1:]
print("| target | workload | mode | ops/s | p50 ms | p99 ms | p99.9 ms | errors | servers us/op | machine us/op | host us | note |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
def row(t, w, mode, label):
    path = f"{out}/{t}-{w}-{mode}/report.json"
    if not os.path.exists(path):
        return
    r = json.load(open(path))
    ops = r["ops"]
    count = sum(o["count"] for o in ops.values())
    errors = sum(o["errors"] for o in ops.values())
    worst = lambda k: max(o[k] for o in ops.values())
    note = "fell behind" if r["fell_behind"] else ""
    cpu = r.get("cpu") or {}
    servers = cpu.get("servers_us_per_op")
    servers = f"{servers:.1f}" if servers is not None else "-"
    machine = cpu.get("machine_us_per_op")
    machine = f"{machine:.1f}" if machine is not None else "-"
    # The host's speed in the cell: the CPU time of shoal-bench's fixed
    # unit of work (median; lower is faster; see bench/src/host.rs), and
    # how many of its seconds ran over a quarter slower than its usual one.
    h = r.get("host") or {}
    host = f"{h['unit_us_median']:.0f} ({h['slow_seconds']} slow s)" if h else "-"
    label = label or (f"open, {r['settings']['rate']:.0f}/s" if r["settings"]["rate"] else "closed, 64 workers")
    print(f"| {t} | {w} | {label} | {count / r['elapsed_secs']:.0f} | {worst('p50_ms'):.3f} | "
          f"{worst('p99_ms'):.3f} | {worst('p999_ms'):.3f} | {errors} | {servers} | {machine} | {host} | {note} |")
for t in targets:
    for w in workloads:
        for mode in ("closed", "open"):
            row(t, w, mode, None)
    row(t, "w", "durable", "closed, 64 workers, durable")
PY
# `shoal dev`'s nodes map their memtables on reserved huge pages of 2 MiB
# where it is safe (README, "Operating a cluster"): say what there was.
echo
echo "Huge pages during the run: $(awk '/^HugePages_Total|^Hugepagesize/ {printf "%s %s %s  ", $1, $2, $3}' /proc/meminfo)(vm.nr_hugepages, the default size; nodes log whether they use them)"
