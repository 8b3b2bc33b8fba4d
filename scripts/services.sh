#!/usr/bin/env bash
# Make sure Redis (6379) and Mosquitto (1883) answer on 127.0.0.1.
# Starts local ones when they are installed but not running; with --install (CI, root) installs
# them from Debian's packages first. Otherwise says exactly what to do.
# Chromium (the status page's browser test) is optional: installed with --install when missing,
# else the test skips, saying why.
#
# --cluster: only make sure a local 3-master Redis Cluster answers (the tests that run against a
# cluster call this): redis-server --cluster-enabled yes on $BB_CLUSTER_PORTS (default
# 7001 7002 7003), each with its own directory under $BB_CLUSTER_DIR (node timeout
# $BB_CLUSTER_NODE_TIMEOUT_MS, default 5000), then
# redis-cli --cluster create … --cluster-replicas 0. Idempotent and safe to run concurrently
# (a lock): a cluster already up is left alone; nodes that are down are started again.
set -u
install=0
[ "${1:-}" = "--install" ] && install=1

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

cluster_ok() {  # port: the node answers and its cluster serves every slot
  redis-cli -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

start_cluster() {
  local ports=${BB_CLUSTER_PORTS:-"7001 7002 7003"}
  local dir=${BB_CLUSTER_DIR:-/tmp/blynk-bridge-cluster}
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || {
    echo "services: redis-server and redis-cli are needed for a local Redis Cluster" >&2
    return 1; }
  mkdir -p "$dir"
  exec 9>"$dir/lock"
  flock -w 120 9 || { echo "services: another run holds $dir/lock" >&2; return 1; }
  local p all_ok=1 nodes=()
  for p in $ports; do
    nodes+=("127.0.0.1:$p")
    cluster_ok "$p" || all_ok=0
  done
  if [ $all_ok = 1 ]; then
    echo "services: Redis Cluster up on ${nodes[*]}"
    return 0
  fi
  for p in $ports; do
    if ! up "$p"; then
      echo "services: starting cluster node redis-server on 127.0.0.1:$p"
      mkdir -p "$dir/$p"
      redis-server --daemonize yes --bind 127.0.0.1 --port "$p" --cluster-enabled yes \
        --cluster-config-file "$dir/$p/nodes.conf" --cluster-node-timeout "${BB_CLUSTER_NODE_TIMEOUT_MS:-5000}" \
        --save "" --appendonly no --dir "$dir/$p" --logfile "$dir/$p/redis.log" \
        --pidfile "$dir/$p/redis.pid" 9>&- || return 1
      wait_up "$p" "cluster node" 300 || return 1  # a loaded machine: up to 60 s
    fi
  done
  local first=${ports%% *}
  # Slots are assigned once; nodes restarted from their nodes.conf rejoin by themselves.
  if [ "$(redis-cli -p "$first" cluster info | sed -n 's/^cluster_slots_assigned:\([0-9]*\).*/\1/p')" = 0 ]; then
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 || {
      echo "services: redis-cli --cluster create failed (log: $dir/create.log)" >&2; return 1; }
  fi
  for _ in $(seq 1 100); do
    all_ok=1
    for p in $ports; do cluster_ok "$p" || all_ok=0; done
    [ $all_ok = 1 ] && { echo "services: Redis Cluster up on ${nodes[*]}"; return 0; }
    sleep 0.2
  done
  echo "services: the Redis Cluster on ${nodes[*]} did not reach cluster_state:ok (logs: $dir)" >&2
  return 1
}

wait_up() {  # port, name[, tries]: wait (default 10 s, 0.2 s a try) for a just-started service
  for _ in $(seq 1 "${3:-50}"); do up "$1" && return 0; sleep 0.2; done
  echo "services: $2 was started but does not answer on 127.0.0.1:$1" >&2
  return 1
}

if [ "${1:-}" = "--cluster" ]; then
  start_cluster
  exit $?
fi

need_install=()
up 6379 || command -v redis-server >/dev/null || need_install+=(redis-server)
up 1883 || command -v mosquitto >/dev/null || need_install+=(mosquitto)
if [ ${#need_install[@]} -gt 0 ]; then
  if [ $install = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "services: installing ${need_install[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}" >/dev/null
  else
    cat >&2 <<MSG
services: ${need_install[*]} not installed and not reachable on 127.0.0.1.
  Install them (Debian/Ubuntu: sudo apt-get install -y redis-server mosquitto; macOS: brew install redis mosquitto)
  or start them in containers:  docker compose --profile demo up -d redis mosquitto
MSG
    exit 1
  fi
fi

if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ $install = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "services: installing chromium (headless browser for tests/test_status_page.py)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
      || echo "services: chromium could not be installed; the browser test will skip" >&2
  else
    echo "services: no chromium: the status page's browser test will skip" \
         "(sudo apt-get install -y chromium)" >&2
  fi
fi

if ! up 6379; then
  echo "services: starting redis-server on 127.0.0.1:6379"
  mkdir -p /tmp/blynk-bridge-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/blynk-bridge-redis --logfile /tmp/blynk-bridge-redis/redis.log
  wait_up 6379 Redis || exit 1
fi
if ! up 1883; then
  echo "services: starting mosquitto on 127.0.0.1:1883"
  conf=/tmp/blynk-bridge-mosquitto.conf
  printf 'listener 1883 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nset_tcp_nodelay true\n' > "$conf"
  mosquitto -d -c "$conf"
  wait_up 1883 Mosquitto || exit 1
fi
echo "services: Redis 127.0.0.1:6379 and Mosquitto 127.0.0.1:1883 are up"
