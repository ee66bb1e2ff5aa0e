#!/usr/bin/env bash
# Installs what building and testing Understudy needs on a bare Debian machine, and nothing by hand:
# - cmake: pingora's build compiles C code with it;
# - promtool (Debian's `prometheus`): tests check every /metrics page with `promtool check metrics`;
# - nats-server (Debian's `nats-server`): the hub's NATS backend tests and the NATS release test
#   start a real server on a free loopback port;
# - PostgreSQL server binaries (Debian's `postgresql`): tests/failover.rs runs two controllers on
#   one shared store, a throwaway server that understudy-testkit's `postgres` module starts
#   (as the `postgres` user when run as root) in a temporary directory on a free loopback port;
# - schemathesis (PyPI, for the machine's python3): tests/api_fuzz.rs fuzzes the admin endpoint
#   from its OpenAPI document;
# - Chromium and its WebDriver server (Debian's `chromium` and `chromium-driver`, the same build
#   of one version): tests/dashboard.rs drives the ops dashboard in headless Chromium through
#   chromedriver on a free loopback port against a running scenario, and takes the screenshots
#   in docs/screenshots/. A test framework's own browser download would not work offline, and
#   Debian's driver always matches Debian's browser.
# Benchmarks install their own extra tools (nginx, wrk) in bench/*.sh.
# Idempotent: it installs only what is missing.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v nats-server >/dev/null 2>&1 || need+=(nats-server)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)

# The server binaries, not only the client: Debian keeps them off PATH, in
# /usr/lib/postgresql/<major>/bin.
postgres_bin() {
  local dir
  for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
    if [ -x "$dir/postgres" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"; return 0
  fi
  return 1
}
postgres_bin >/dev/null || need+=(postgresql)

if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "setup: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The major version the test's config and hooks are written for.
schemathesis_spec='schemathesis>=4,<5'
if ! python3 -c 'import schemathesis, sys; sys.exit(schemathesis.__version__.split(".")[0] != "4")' >/dev/null 2>&1; then
  command -v python3 >/dev/null 2>&1 || { echo "setup: python3 is not installed" >&2; exit 1; }
  echo "setup: installing $schemathesis_spec"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$schemathesis_spec"
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo is not installed (install Rust with rustup)" >&2; exit 1; }
pg_bin="$(postgres_bin)" || { echo "setup: the PostgreSQL server binaries are still missing" >&2; exit 1; }
echo "setup: ready ($(cargo --version), $(cmake --version | head -n1), promtool $(promtool --version 2>&1 | head -n1 | awk '{print $3}'), nats-server $(nats-server --version 2>&1 | awk '{print $NF}'), schemathesis $(python3 -c 'import schemathesis; print(schemathesis.__version__)'), PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}'), $(chromium --version 2>/dev/null | awk '{print $1, $2}'))"
