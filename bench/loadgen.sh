#!/usr/bin/env bash
# Load generator benchmark: understudy-loadgen against wrk on the same target, one run,
# interleaved repeats, medians. Not a test: it measures, it does not judge.
#
#   bench/loadgen.sh                          # REPEATS=5 DURATION=5 CONNS=32 RATES="5000 20000"
#   REPEATS=3 DURATION=3 TARGET=nginx bench/loadgen.sh
#
# - maximum: wrk -t1 -cCONNS against `understudy-loadgen run --closed --threads 1
#   --connections CONNS` (each connection sends its next job when the last is answered, as wrk
#   does); both POST the same small SMS body. Requests/s and client CPU per request.
# - held rate: `understudy-loadgen run --rate R` (open loop, latency from intended send times):
#   achieved rate, p50/p99, the generator's own send lag p99, errors.
# Target (TARGET=machine, default): a simulated machine with zero latency on one thread;
# TARGET=nginx: nginx, one worker, `return 200`. Target pinned to CPU 1, clients to CPU 0.
# Installs wrk (and nginx if asked for) with apt-get when missing; writes the Markdown table to
# $OUT (default target/bench-loadgen.md) and prints it.
set -euo pipefail

REPEATS=${REPEATS:-5}
DURATION=${DURATION:-5}
CONNS=${CONNS:-32}
RATES=${RATES:-"5000 20000"}
TARGET=${TARGET:-machine}
NGINX_PORT=${NGINX_PORT:-18980}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/target/bench-loadgen.md}

need=()
command -v wrk >/dev/null || need+=(wrk)
[ "$TARGET" = nginx ] && ! command -v nginx >/dev/null && need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

(cd "$ROOT" && cargo build --release -q -p understudy-loadgen)
LG=$ROOT/target/release/understudy-loadgen

WORK=$(mktemp -d /tmp/understudy-bench-loadgen.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

case "$TARGET" in
machine)
    taskset -c 1 "$LG" machine --service sms --threads 1 --bind 127.0.0.1:0 >"$WORK/machine.out" 2>"$WORK/machine.err" &
    PIDS+=($!)
    for _ in $(seq 1 100); do
        URL=$(sed -n 's/^listening on //p' "$WORK/machine.out")
        [ -n "$URL" ] && break
        sleep 0.05
    done
    [ -n "$URL" ] || { echo "machine did not start" >&2; cat "$WORK/machine.err" >&2; exit 1; }
    TARGET_DESC="simulated machine (understudy-loadgen machine, zero latency, 1 thread)"
    ;;
nginx)
    mkdir -p "$WORK/nginx/logs"
    cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  server { listen 127.0.0.1:$NGINX_PORT; location / { return 200 "ok\n"; } }
}
EOF
    taskset -c 1 nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
    PIDS+=($!)
    URL=http://127.0.0.1:$NGINX_PORT
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$NGINX_PORT") 2>/dev/null && break
        sleep 0.05
    done
    TARGET_DESC="nginx 1 worker, return 200"
    ;;
*)
    echo "TARGET must be machine or nginx" >&2
    exit 2
    ;;
esac

# The same request as understudy-loadgen's SMS job: POST /sms/send with a small text body.
cat >"$WORK/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = "to=+15550000001&text=job 1"
wrk.headers["Content-Type"] = "text/plain"
EOF

RESULTS=$WORK/results.tsv
: >"$RESULTS"
TIMEFMT="%U %S"

run_wrk() {
    /usr/bin/time -f "$TIMEFMT" -o "$WORK/time" taskset -c 0 \
        wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$WORK/post.lua" "$URL/sms/send" >"$WORK/wrk.out"
    local rps reqs cpu
    rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")
    reqs=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
    cpu=$(awk '{print $1 + $2}' "$WORK/time")
    printf 'wrk_max\t%s\t%s\t%s\n' "$rps" "$reqs" "$cpu" >>"$RESULTS"
}

run_lg_max() {
    /usr/bin/time -f "$TIMEFMT" -o "$WORK/time" taskset -c 0 \
        "$LG" run --target "$URL" --closed --threads 1 --connections "$CONNS" \
        --duration "$DURATION" --json --quiet >"$WORK/lg.json"
    python3 - "$WORK/lg.json" "$(awk '{print $1 + $2}' "$WORK/time")" >>"$RESULTS" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"lg_max\t{r['sent'] / r['elapsed_s']:.1f}\t{r['sent']}\t{sys.argv[2]}\t{r['errors']}")
EOF
}

run_lg_rate() {
    local rate=$1
    taskset -c 0 "$LG" run --target "$URL" --rate "$rate" --threads 1 --connections "$CONNS" \
        --duration "$DURATION" --json --quiet >"$WORK/lg.json"
    python3 - "$WORK/lg.json" "$rate" >>"$RESULTS" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency"]
print(f"lg_rate_{sys.argv[2]}\t{r['send_rate']:.1f}\t{l['p50_us']}\t{l['p99_us']}\t{r['send_lag']['p99_us']}\t{r['errors']}")
EOF
}

for i in $(seq 1 "$REPEATS"); do
    echo "repeat $i/$REPEATS" >&2
    run_wrk
    run_lg_max
    for rate in $RATES; do run_lg_rate "$rate"; done
done

python3 - "$RESULTS" "$REPEATS" "$DURATION" "$CONNS" "$TARGET_DESC" "$TARGET" "$RATES" >"$OUT" <<'EOF'
import statistics, sys
from collections import defaultdict
path, repeats, duration, conns, desc, target, rates = sys.argv[1:8]
rows = defaultdict(list)
for line in open(path):
    name, *values = line.rstrip("\n").split("\t")
    rows[name].append([float(v) for v in values])
med = lambda name, i: statistics.median(r[i] for r in rows[name])
wrk_rps, lg_rps = med("wrk_max", 0), med("lg_max", 0)
wrk_cpu = statistics.median(r[2] / r[1] * 1e6 for r in rows["wrk_max"])
lg_cpu = statistics.median(r[2] / r[1] * 1e6 for r in rows["lg_max"])
print(f"Target: {desc}, pinned to CPU 1; clients pinned to CPU 0, one thread each, {conns} "
      f"keep-alive connections, {duration} s per run, {repeats} interleaved repeats, medians.\n")
# Adjacent runs share the machine's conditions: the median of per-pair ratios is the steadier figure.
pair = statistics.median(l[0] / w[0] for w, l in zip(rows["wrk_max"], rows["lg_max"]))
print("| client | max requests/s | ratio to wrk (medians) | median of per-repeat ratios | client CPU per request | errors |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
print(f"| wrk -t1 -c{conns} | {wrk_rps:,.0f} | 1.00 | 1.00 | {wrk_cpu:.1f} us | |")
print(f"| understudy-loadgen --closed --threads 1 | {lg_rps:,.0f} | {lg_rps / wrk_rps:.2f} | {pair:.2f} "
      f"| {lg_cpu:.1f} us | {max(r[3] for r in rows['lg_max']):.0f} |")
print()
print("| understudy-loadgen open loop, set rate | achieved rate | p50 | p99 | generator send lag p99 | errors |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for rate in rates.split():
    name = f"lg_rate_{rate}"
    print(f"| {int(rate):,}/s | {med(name, 0):,.0f}/s ({med(name, 0) / float(rate):.3f}x) "
          f"| {med(name, 1) / 1000:.2f} ms | {med(name, 2) / 1000:.2f} ms "
          f"| {med(name, 3) / 1000:.2f} ms | {max(r[4] for r in rows[name]):.0f} |")
print()
print(f"Per-run figures (wrk req/s; loadgen req/s): "
      f"{', '.join(f'{r[0]:,.0f}' for r in rows['wrk_max'])}; "
      f"{', '.join(f'{r[0]:,.0f}' for r in rows['lg_max'])}")
EOF
cat "$OUT"
