#!/usr/bin/env bash
# Make sure Redis (6379) and Mosquitto (1883) answer on 127.0.0.1.
# Starts local ones when they are installed but not running; with --install (CI, root) installs
# them from Debian's packages first. Otherwise says exactly what to do.
# Chromium (the status page's browser test) is optional: installed with --install when missing,
# else the test skips, saying why.
set -u
install=0
[ "${1:-}" = "--install" ] && install=1

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_up() {  # port, name: wait up to 10 s for a just-started service
  for _ in $(seq 1 50); do up "$1" && return 0; sleep 0.2; done
  echo "services: $2 was started but does not answer on 127.0.0.1:$1" >&2
  return 1
}

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
