#!/usr/bin/env bash
# Balancer benchmark: understudy-proxy against nginx, same backend, same wrk load, one run,
# interleaved repeats, medians. Not a test: it measures, it does not judge.
#
#   bench/balancer.sh            # REPEATS=5 DURATION=8 (seconds per run) CONNS=32
#   REPEATS=3 DURATION=5 bench/balancer.sh
#   ABLATIONS=1 bench/balancer.sh  # two more rows: understudy-proxy with pingora's work-stealing
#                                  # scheduler, and the 20 ms mirror without the per-version cap
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
LAST_PID=
start() {
    STARTED=$((STARTED + 1))
    "$@" >"$WORK/$STARTED-$(basename "$1").log" 2>&1 &
    LAST_PID=$!
    PIDS+=($!)
}
declare -A SERVER_PID  # name -> pid of the process under test (nginx: its master)

start "$BIN/examples/bench_backend" "$BACKEND"
SERVER_PID[backend-direct]=$LAST_PID
start "$BIN/examples/bench_backend" "$MIRROR"
start "$BIN/examples/bench_backend" "$SLOW" 20

# nginx: one worker, keep-alive to the upstreams; `mirror` sends a subrequest per job.
nginx_conf() { # name port mirror_port(or empty) row
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
    SERVER_PID[$4]=$LAST_PID
}

proxy_conf() { # name port admin_port mirror_port(or empty) row [extra flags...]
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
    # Deployed as in production: a config key and the cluster's marker key (copies carry a
    # signed marker token).
    [ -f "$WORK/bench.key" ] || head -c 32 /dev/urandom | base64 >"$WORK/bench.key"
    [ -f "$WORK/marker.key" ] || head -c 32 /dev/urandom | base64 >"$WORK/marker.key"
    RUST_LOG=warn start "$BIN/understudy-proxy" --config "$file" --threads 1 --mirror-threads 1 \
        --key-file "bench=$WORK/bench.key" --marker-key-file "$WORK/marker.key" "${@:6}"
    SERVER_PID[$5]=$LAST_PID
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
    [understudy,work-stealing]=$((BASE + 23))
    [understudy+mirror-20ms,uncapped]=$((BASE + 24))
)
declare -A ADMIN=(
    [understudy]=$((BASE + 30))
    [understudy+mirror]=$((BASE + 31))
    [understudy+mirror-20ms]=$((BASE + 32))
)
ORDER=(backend-direct nginx nginx+mirror nginx+mirror-20ms understudy understudy+mirror understudy+mirror-20ms)
if [ "${ABLATIONS:-0}" = 1 ]; then
    ORDER+=(understudy,work-stealing understudy+mirror-20ms,uncapped)
    ADMIN[understudy,work-stealing]=$((BASE + 33))
    ADMIN[understudy+mirror-20ms,uncapped]=$((BASE + 34))
fi

nginx_conf plain "${PORT[nginx]}" "" nginx
nginx_conf mirror "${PORT[nginx+mirror]}" "$MIRROR" nginx+mirror
nginx_conf slow "${PORT[nginx+mirror-20ms]}" "$SLOW" nginx+mirror-20ms
proxy_conf plain "${PORT[understudy]}" "${ADMIN[understudy]}" "" understudy
proxy_conf mirror "${PORT[understudy+mirror]}" "${ADMIN[understudy+mirror]}" "$MIRROR" understudy+mirror
proxy_conf slow "${PORT[understudy+mirror-20ms]}" "${ADMIN[understudy+mirror-20ms]}" "$SLOW" \
    understudy+mirror-20ms
if [ "${ABLATIONS:-0}" = 1 ]; then
    proxy_conf plain-stealing "${PORT[understudy,work-stealing]}" \
        "${ADMIN[understudy,work-stealing]}" "" understudy,work-stealing --work-stealing
    proxy_conf slow-uncapped "${PORT[understudy+mirror-20ms,uncapped]}" \
        "${ADMIN[understudy+mirror-20ms,uncapped]}" "$SLOW" understudy+mirror-20ms,uncapped \
        --mirror-per-active 0
fi
for name in "${ORDER[@]}"; do wait_port "${PORT[$name]}"; done
for p in "${ADMIN[@]}"; do wait_port "$p"; done

# wrk prints latencies as 812.00us / 1.23ms / 1.01s: normalise to ms.
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'; }

# CPU time (user + system, clock ticks) of a process and its children (nginx's workers), all
# threads included: the server's own cost, whatever else runs on the machine.
cpu_ticks() { # pid
    local total=0 pid
    for pid in "$1" $(pgrep -P "$1" || true); do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

run_wrk() { # name duration -> "rps p50 p99 cpu_us_per_job"
    local out before after
    before=$(cpu_ticks "${SERVER_PID[$1]}")
    out=$(wrk -t1 -c"$CONNS" -d"$2"s --latency "http://127.0.0.1:${PORT[$1]}/")
    after=$(cpu_ticks "${SERVER_PID[$1]}")
    local rps p50 p99 jobs
    rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    p50=$(awk '$1 == "50%" { print $2 }' <<<"$out")
    p99=$(awk '$1 == "99%" { print $2 }' <<<"$out")
    jobs=$(awk '/requests in/ { print $1 }' <<<"$out")
    echo "$rps $(to_ms "$p50") $(to_ms "$p99") $(awk -v t=$((after - before)) -v j="$jobs" -v u="$TICK_US" \
        'BEGIN { printf "%.1f", (j > 0 ? t * u / j : 0) }')"
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
        /^understudy_balancer_mirror_held_total/ { held += $NF }
        END { printf "%d answered, %d dropped, %d held back by the per-version cap", made, dropped, held }' || echo "n/a"
}

python3 - "$RESULTS" "$REPEATS" "$DURATION" "$CONNS" "$(nproc)" \
    "$(copies "${ADMIN[understudy+mirror]}")" "$(copies "${ADMIN[understudy+mirror-20ms]}")" \
    "$(if [ "${ABLATIONS:-0}" = 1 ]; then copies "${ADMIN[understudy+mirror-20ms,uncapped]}"; fi)" \
    "${ORDER[@]}" >"$OUT" <<'EOF'
import statistics, sys
path, repeats, duration, conns, cores, copies_fast, copies_slow, copies_uncapped, *order = sys.argv[1:]
rows = {}
for line in open(path):
    name, rep, rps, p50, p99, cpu = line.split()
    rows.setdefault(name, []).append((float(rps), float(p50), float(p99), float(cpu), int(rep)))
med = {n: tuple(statistics.median(v[i] for v in rows[n]) for i in range(4)) for n in order}
def ratio_median(a, b, i=0):
    """Median over repeats of a/b, each repeat's two runs taken minutes apart at most."""
    by_rep = {v[4]: v[i] for v in rows[b]}
    return statistics.median(v[i] / by_rep[v[4]] for v in rows[a])
print(f"wrk -t1 -c{conns}, {duration} s per run, {repeats} interleaved repeats, medians; "
      f"{cores} cores; one worker each (understudy-proxy: one pingora worker, and one thread for "
      f"copies in the mirror configurations). Server CPU per job: user + system time of the "
      f"proxy process(es) over the jobs wrk completed.\n")
print("| configuration | req/s | p50 ms | p99 ms | req/s vs nginx proxy_pass | server CPU per job us |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
base = med["nginx"][0]
for n in order:
    rps, p50, p99, cpu = med[n]
    print(f"| {n} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {rps / base:.2f} | {cpu:.1f} |")
u, um, us = med["understudy"], med["understudy+mirror"], med["understudy+mirror-20ms"]
nm, ns = med["nginx+mirror"], med["nginx+mirror-20ms"]
print()
print(f"- active only vs nginx proxy_pass: {u[0] / base:.2f}x throughput (target >= 1); "
      f"median of per-repeat ratios {ratio_median('understudy', 'nginx'):.2f}x; "
      f"CPU per job {u[3]:.1f} us vs {med['nginx'][3]:.1f} us")
print(f"- mirroring 100% vs nginx + mirror: {um[0] / nm[0]:.2f}x throughput (target >= 1), "
      f"p99 {um[2]:.2f} ms vs {nm[2]:.2f} ms (target <=)")
print(f"- 20 ms mirror vs fast mirror, understudy: {us[0] / um[0] - 1:+.1%} throughput "
      f"(median of per-repeat ratios {ratio_median('understudy+mirror-20ms', 'understudy+mirror') - 1:+.1%}; "
      f"target > -10%); nginx: {ns[0] / nm[0] - 1:+.1%}")
print(f"- copies over all runs, fast mirror: {copies_fast}; 20 ms mirror: {copies_slow}")
if "understudy,work-stealing" in med:
    w = med["understudy,work-stealing"]
    print(f"- ablation, pingora's work-stealing scheduler (the library default) instead of one "
          f"current-thread runtime: {w[0] / u[0] - 1:+.1%} throughput (median of per-repeat ratios "
          f"{ratio_median('understudy,work-stealing', 'understudy') - 1:+.1%}), CPU per job "
          f"{w[3]:.1f} us vs {u[3]:.1f} us")
if "understudy+mirror-20ms,uncapped" in med:
    x = med["understudy+mirror-20ms,uncapped"]
    print(f"- ablation, 20 ms mirror without the per-version cap (--mirror-per-active 0): "
          f"{x[0] / um[0] - 1:+.1%} throughput vs the fast mirror (median of per-repeat ratios "
          f"{ratio_median('understudy+mirror-20ms,uncapped', 'understudy+mirror') - 1:+.1%}), "
          f"p99 {x[2]:.2f} ms, CPU per job {x[3]:.1f} us; copies: {copies_uncapped}")
EOF
cat "$OUT"
