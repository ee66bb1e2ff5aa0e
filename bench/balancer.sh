#!/usr/bin/env bash
# Balancer benchmark: understudy-proxy against nginx, same backend, same wrk load, one run,
# interleaved repeats, medians. Not a test: it measures, it does not judge.
#
#   bench/balancer.sh            # REPEATS=5 DURATION=8 (seconds per run) CONNS=32
#   REPEATS=3 DURATION=5 bench/balancer.sh
#
# Installs nginx and wrk with apt-get when missing, builds release binaries, prints a Markdown
# table (req/s, p50, p99, ratios) and writes it to $OUT (default: target/bench-balancer.md).
set -euo pipefail

REPEATS=${REPEATS:-5}
DURATION=${DURATION:-8}
CONNS=${CONNS:-32}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/target/bench-balancer.md}
BASE=${BASE_PORT:-18000}

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx wrk >/dev/null
fi
NGINX=$(command -v nginx)

(cd "$ROOT" && cargo build --release -q -p understudy-proxy --bin understudy-proxy --example bench_backend)
BIN=$ROOT/target/release

WORK=$(mktemp -d /tmp/understudy-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

BACKEND=$((BASE + 1))      # the active machine
MIRROR=$((BASE + 2))       # a mirror machine answering at once
SLOW=$((BASE + 3))         # a mirror machine answering 20 ms late

wait_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "port $1 never opened" >&2
    exit 1
}

STARTED=0
start() {
    STARTED=$((STARTED + 1))
    "$@" >"$WORK/$STARTED-$(basename "$1").log" 2>&1 &
    PIDS+=($!)
}

start "$BIN/examples/bench_backend" "$BACKEND"
start "$BIN/examples/bench_backend" "$MIRROR"
start "$BIN/examples/bench_backend" "$SLOW" 20

# nginx: one worker, keep-alive to the upstreams; `mirror` sends a subrequest per job.
nginx_conf() { # name port mirror_port(or empty)
    local dir=$WORK/nginx-$1
    mkdir -p "$dir"
    local mirror_directives="" mirror_location=""
    if [ -n "$3" ]; then
        mirror_directives="mirror /__mirror; mirror_request_body on;"
        mirror_location="location = /__mirror { internal; proxy_pass http://mirror_backend\$request_uri;
            proxy_http_version 1.1; proxy_set_header Connection \"\";
            proxy_set_header x-understudy-simulation 1; }"
    fi
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/body; proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fcgi; uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
    upstream backend { server 127.0.0.1:$BACKEND; keepalive 64; }
    upstream mirror_backend { server 127.0.0.1:${3:-$MIRROR}; keepalive 64; }
    server {
        listen 127.0.0.1:$2;
        location / {
            $mirror_directives
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
        $mirror_location
    }
}
EOF
    start "$NGINX" -p "$dir" -c "$dir/nginx.conf"
}

proxy_conf() { # name port admin_port mirror_port(or empty)
    local file=$WORK/$1.toml
    cat >"$file" <<EOF
admin = "127.0.0.1:$3"
[[balancers]]
listen = "127.0.0.1:$2"
[balancers.config]
service = "bench"
version = 1
mirror_fraction = 1.0
[[balancers.config.machines]]
id = "v1-a"
version = "v1"
address = "127.0.0.1:$BACKEND"
config = "active"
EOF
    if [ -n "$4" ]; then
        cat >>"$file" <<EOF
[[balancers.config.machines]]
id = "v2-a"
version = "v2"
address = "127.0.0.1:$4"
config = "simulation"
EOF
    fi
    RUST_LOG=warn start "$BIN/understudy-proxy" --config "$file" --threads 1 --mirror-threads 1
}

# name -> port
declare -A PORT=(
    [backend-direct]=$BACKEND
    [nginx]=$((BASE + 10))
    [nginx+mirror]=$((BASE + 11))
    [nginx+mirror-20ms]=$((BASE + 12))
    [understudy]=$((BASE + 20))
    [understudy+mirror]=$((BASE + 21))
    [understudy+mirror-20ms]=$((BASE + 22))
)
declare -A ADMIN=(
    [understudy]=$((BASE + 30))
    [understudy+mirror]=$((BASE + 31))
    [understudy+mirror-20ms]=$((BASE + 32))
)
ORDER=(backend-direct nginx nginx+mirror nginx+mirror-20ms understudy understudy+mirror understudy+mirror-20ms)

nginx_conf plain "${PORT[nginx]}" ""
nginx_conf mirror "${PORT[nginx+mirror]}" "$MIRROR"
nginx_conf slow "${PORT[nginx+mirror-20ms]}" "$SLOW"
proxy_conf plain "${PORT[understudy]}" "${ADMIN[understudy]}" ""
proxy_conf mirror "${PORT[understudy+mirror]}" "${ADMIN[understudy+mirror]}" "$MIRROR"
proxy_conf slow "${PORT[understudy+mirror-20ms]}" "${ADMIN[understudy+mirror-20ms]}" "$SLOW"
for name in "${ORDER[@]}"; do wait_port "${PORT[$name]}"; done
for p in "${ADMIN[@]}"; do wait_port "$p"; done

# wrk prints latencies as 812.00us / 1.23ms / 1.01s: normalise to ms.
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'; }

run_wrk() { # name duration -> "rps p50 p99"
    local out
    out=$(wrk -t1 -c"$CONNS" -d"$2"s --latency "http://127.0.0.1:${PORT[$1]}/")
    local rps p50 p99
    rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    p50=$(awk '$1 == "50%" { print $2 }' <<<"$out")
    p99=$(awk '$1 == "99%" { print $2 }' <<<"$out")
    echo "$rps $(to_ms "$p50") $(to_ms "$p99")"
}

echo "warm-up..." >&2
for name in "${ORDER[@]}"; do run_wrk "$name" 2 >/dev/null; done

RESULTS=$WORK/results.tsv
for rep in $(seq 1 "$REPEATS"); do
    for name in "${ORDER[@]}"; do
        line=$(run_wrk "$name" "$DURATION")
        echo "$name $rep $line" >>"$RESULTS"
        echo "  repeat $rep  $name  $line" >&2
    done
done

# Copies the balancer made and dropped over all runs (from its own metrics).
copies() { # admin_port
    curl -s "http://127.0.0.1:$1/metrics" 2>/dev/null | awk '
        /^understudy_balancer_jobs_total\{.*config="simulation"/ { made += $NF }
        /^understudy_balancer_mirror_dropped_total/ { dropped += $NF }
        END { printf "%d answered, %d dropped", made, dropped }' || echo "n/a"
}

python3 - "$RESULTS" "$REPEATS" "$DURATION" "$CONNS" "$(nproc)" \
    "$(copies "${ADMIN[understudy+mirror]}")" "$(copies "${ADMIN[understudy+mirror-20ms]}")" \
    "${ORDER[@]}" >"$OUT" <<'EOF'
import statistics, sys
path, repeats, duration, conns, cores, copies_fast, copies_slow, *order = sys.argv[1:]
rows = {}
for line in open(path):
    name, _rep, rps, p50, p99 = line.split()
    rows.setdefault(name, []).append((float(rps), float(p50), float(p99)))
med = {n: tuple(statistics.median(v[i] for v in rows[n]) for i in range(3)) for n in order}
print(f"wrk -t1 -c{conns}, {duration} s per run, {repeats} interleaved repeats, medians; "
      f"{cores} cores; one worker each.\n")
print("| configuration | req/s | p50 ms | p99 ms | req/s vs nginx proxy_pass |")
print("| --- | ---: | ---: | ---: | ---: |")
base = med["nginx"][0]
for n in order:
    rps, p50, p99 = med[n]
    print(f"| {n} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {rps / base:.2f} |")
u, um, us = med["understudy"], med["understudy+mirror"], med["understudy+mirror-20ms"]
nm, ns = med["nginx+mirror"], med["nginx+mirror-20ms"]
print()
print(f"- active only vs nginx proxy_pass: {u[0] / base:.2f}x throughput (target >= 1)")
print(f"- mirroring 100% vs nginx + mirror: {um[0] / nm[0]:.2f}x throughput (target >= 1), "
      f"p99 {um[2]:.2f} ms vs {nm[2]:.2f} ms (target <=)")
print(f"- 20 ms mirror vs fast mirror, understudy: {us[0] / um[0] - 1:+.1%} throughput "
      f"(target > -10%); nginx: {ns[0] / nm[0] - 1:+.1%}")
print(f"- copies over all runs, fast mirror: {copies_fast}; 20 ms mirror: {copies_slow}")
EOF
cat "$OUT"
