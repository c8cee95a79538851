#!/usr/bin/env bash
# A two-host network on one machine for remote lazy-pages tests and measurements.
#
#   scripts/netns-link.sh up     # namespaces lr-src (10.200.0.1) and lr-dst (10.200.0.2), veth, 1 Gbit/s
#   scripts/netns-link.sh down   # remove them (and the delay proxy)
#   scripts/netns-link.sh status
#
# The addresses exist only inside the two namespaces: no traffic leaves this machine. Each veth
# end gets a tbf qdisc (1 Gbit/s). This kernel has no netem, so the ~1 ms RTT comes from our
# delay proxy (crates/lazy-restore-core/examples/delay_proxy.rs): `up` starts it inside lr-dst
# on 127.0.0.1:$PROXY_PORT, forwarding to 10.200.0.1:$TARGET_PORT with 0.5 ms each way; a
# client in lr-dst connects to the proxy to see the delayed link, or to 10.200.0.1 directly
# for the undelayed 1 Gbit/s link.
#
# Environment: RATE (default 1gbit), DELAY_US (500), TARGET_PORT (7070), PROXY_PORT (7071).
set -euo pipefail

SRC=lr-src
DST=lr-dst
RATE=${RATE:-1gbit}
DELAY_US=${DELAY_US:-500}
TARGET_PORT=${TARGET_PORT:-7070}
PROXY_PORT=${PROXY_PORT:-7071}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PIDFILE=/run/lr-netns-proxy.pid

proxy_bin() {
  local t=${CARGO_TARGET_DIR:-$ROOT/target}
  if [ ! -x "$t/release/examples/delay_proxy" ]; then
    (cd "$ROOT" && cargo build --quiet --release -p lazy-restore-core --example delay_proxy)
  fi
  echo "$t/release/examples/delay_proxy"
}

up() {
  down quiet
  ip netns add $SRC
  ip netns add $DST
  ip link add lr-veth-s type veth peer name lr-veth-d
  ip link set lr-veth-s netns $SRC
  ip link set lr-veth-d netns $DST
  ip -n $SRC addr add 10.200.0.1/30 dev lr-veth-s
  ip -n $DST addr add 10.200.0.2/30 dev lr-veth-d
  for ns in $SRC $DST; do ip -n $ns link set lo up; done
  ip -n $SRC link set lr-veth-s up
  ip -n $DST link set lr-veth-d up
  # 1 Gbit/s each way; burst sized for 1 Gbit at a 1 ms timer, latency cap 5 ms.
  ip netns exec $SRC tc qdisc add dev lr-veth-s root tbf rate "$RATE" burst 256kb latency 5ms
  ip netns exec $DST tc qdisc add dev lr-veth-d root tbf rate "$RATE" burst 256kb latency 5ms
  local bin
  bin=$(proxy_bin)
  ip netns exec $DST "$bin" 127.0.0.1:$PROXY_PORT 10.200.0.1:$TARGET_PORT "$DELAY_US" \
    >/run/lr-netns-proxy.log 2>&1 &
  echo $! >$PIDFILE
  echo "up: $SRC 10.200.0.1 <-> $DST 10.200.0.2 at $RATE; in $DST, 127.0.0.1:$PROXY_PORT -> 10.200.0.1:$TARGET_PORT +${DELAY_US}us each way"
}

down() {
  if [ -f $PIDFILE ]; then
    kill "$(cat $PIDFILE)" 2>/dev/null || true
    rm -f $PIDFILE
  fi
  ip netns del $SRC 2>/dev/null || true
  ip netns del $DST 2>/dev/null || true
  [ "${1:-}" = quiet ] || echo "down"
}

status() {
  ip netns list | grep -E "^($SRC|$DST)\b" || echo "no namespaces"
  ip netns exec $SRC tc qdisc show dev lr-veth-s 2>/dev/null || true
  [ -f $PIDFILE ] && echo "delay proxy pid $(cat $PIDFILE)" || echo "no delay proxy"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
