#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script). Release profile: the
# end-to-end scenarios judge latency, and an unoptimised build would judge the build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace --release --locked --no-fail-fast
