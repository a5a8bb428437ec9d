#!/usr/bin/env bash
# Dev Apache Kafka: a single-node KRaft broker on 127.0.0.1, jars from Maven Central.
#
#   infra/kafka/kafka.sh fetch                 resolve the broker jars into the cache (Maven)
#   infra/kafka/kafka.sh up   [--port P]       format (first time) and start; waits until it accepts connections
#   infra/kafka/kafka.sh down [--port P]       stop cleanly (SIGTERM, then wait)
#   infra/kafka/kafka.sh status [--port P]
#
# Environment: KAFKA_VERSION (3.9.1), KAFKA_PORT (9092), KAFKA_CACHE (~/.cache/simstream/kafka),
# KAFKA_DATA (a directory per port under the cache), KAFKA_EXTRA_CONFIG (a file appended to
# server.properties, e.g. for a TLS listener), KAFKA_SCRAM_USERS (SCRAM credentials registered
# when the storage is formatted).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="${KAFKA_VERSION:-3.9.1}"
port="${KAFKA_PORT:-9092}"
cache="${KAFKA_CACHE:-$HOME/.cache/simstream/kafka}"
cmd="${1:-}"; shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --data) KAFKA_DATA="$2"; shift 2 ;;
    *) echo "kafka.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
libs="$cache/$version/libs"
data="${KAFKA_DATA:-$cache/data-$port}"
controller_port="${KAFKA_CONTROLLER_PORT:-$((port + 1))}"
pidfile="$data/broker.pid"
logfile="$data/broker.log"

fetch() {
  if [ -f "$libs/.complete" ]; then return 0; fi
  command -v mvn >/dev/null || { echo "kafka.sh: Maven (mvn) is needed to fetch Kafka $version" >&2; exit 1; }
  echo "Fetching Apache Kafka $version jars from Maven Central into $libs ..."
  mkdir -p "$libs"
  mvn -q -B -f "$here/pom.xml" -Dkafka.version="$version" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$libs"
  touch "$libs/.complete"
}

is_up() {
  # A TCP connect to the client port; bash's /dev/tcp avoids needing nc.
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

up() {
  fetch
  command -v java >/dev/null || { echo "kafka.sh: Java 17 is needed to run Kafka" >&2; exit 1; }
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && is_up; then
    echo "Kafka already running on 127.0.0.1:$port (pid $(cat "$pidfile"))"; return 0
  fi
  if is_up; then echo "kafka.sh: port $port is taken by something else" >&2; exit 1; fi
  mkdir -p "$data"
  local props="$data/server.properties"
  sed -e "s#@PORT@#$port#g" -e "s#@CONTROLLER_PORT@#$controller_port#g" -e "s#@LOGDIR@#$data/log#g" \
      "$here/server.properties.in" > "$props"
  if [ -n "${KAFKA_EXTRA_CONFIG:-}" ]; then cat "$KAFKA_EXTRA_CONFIG" >> "$props"; fi
  local cp="$libs/*"
  local jvm=(-Xms256m -Xmx1g -Dlog4j.configuration="file:$here/log4j.properties" -Dkafka.logs.dir="$data")
  if [ ! -f "$data/log/meta.properties" ]; then
    local cluster_id
    cluster_id="$(java -cp "$cp" "${jvm[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)"
    local scram=()
    # KAFKA_SCRAM_USERS, e.g. 'SCRAM-SHA-256=[name=alice,password=secret]', registers SCRAM users.
    if [ -n "${KAFKA_SCRAM_USERS:-}" ]; then scram=(--add-scram "$KAFKA_SCRAM_USERS"); fi
    java -cp "$cp" "${jvm[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$props" "${scram[@]}" >/dev/null
  fi
  nohup java -cp "$cp" "${jvm[@]}" kafka.Kafka "$props" >"$logfile" 2>&1 &
  echo $! > "$pidfile"
  for _ in $(seq 1 120); do
    if is_up; then echo "Kafka $version up on 127.0.0.1:$port (pid $(cat "$pidfile"), data $data)"; return 0; fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "kafka.sh: broker exited during start-up; last log lines:" >&2; tail -n 30 "$logfile" >&2; exit 1
    fi
    sleep 0.5
  done
  echo "kafka.sh: broker did not accept connections within 60 s; see $logfile" >&2; exit 1
}

down() {
  if [ ! -f "$pidfile" ]; then echo "Kafka not running on port $port (no pid file)"; return 0; fi
  local pid; pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then echo "kafka.sh: broker did not stop in 30 s; killing" >&2; kill -KILL "$pid" || true; fi
  fi
  rm -f "$pidfile"
  echo "Kafka on port $port stopped"
}

case "$cmd" in
  fetch) fetch ;;
  up) up ;;
  down) down ;;
  status) if is_up; then echo "up on 127.0.0.1:$port"; else echo "down"; exit 1; fi ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
