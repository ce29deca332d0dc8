#!/usr/bin/env bash
# Idle cost of one worker on an empty Redis queue: its CPU and the Redis commands per
# second it causes. Usage: bench/idle-redis.sh [seconds] (default 30). Needs the Redis
# on 127.0.0.1:6379 and nothing else talking to it during the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs="${1:-30}"
cargo build --quiet --release -p demo-worker
prefix="idle-$$"
REDIS_URL=redis://127.0.0.1:6379 REDIS_PREFIX="$prefix" WORKER_QUEUES=idle \
  WORKER_HTTP_ADDR=off RUST_LOG=warn target/release/demo-worker >/dev/null &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
sleep 3
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
t0=$(ticks)
# MONITOR shows every command; those a script runs inside Redis are marked "lua" and
# are not round trips the worker causes, so only the others are counted.
sent=$(timeout "$secs" redis-cli -h 127.0.0.1 monitor | grep -v -c -E '^OK$|\[[0-9]+ lua\]' || true)
t1=$(ticks)
hz=$(getconf CLK_TCK)
awk -v n="$sent" -v t0="$t0" -v t1="$t1" -v hz="$hz" -v s="$secs" 'BEGIN {
  printf "idle worker over %d s: cpu %.3f %% of one core, %.2f redis commands/s sent\n",
    s, (t1 - t0) / hz / s * 100, n / s
}'
