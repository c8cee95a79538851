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
# Under each tbf sits a two-band priority scheduler, so packets of sockets marked SO_PRIORITY
# 6 or 7 (TC_PRIO_INTERACTIVE/CONTROL: lazy-restore's urgent fault connection, both ends) leave
# before bulk packets already queued; without it a fault reply waits behind up to QUEUE_MS of
# bulk bytes in the tbf queue. That is what a `prio` qdisc (handle 10:) does with its default
# priomap, but this kernel is built without sch_prio (CONFIG_NET_SCH_PRIO is not set), so the
# same strict priority is built from what it has: an htb (handle 10:) whose two classes never
# reach their own rate (the tbf above limits the link), class 10:1 prio 0 = band 0 (urgent)
# and class 10:2 prio 1 = band 1 (everything else, the default), each a bfifo of QUEUE_MS at
# RATE (11: and 12:), picked by a tiny eBPF classifier on skb->priority (compiled with clang
# at `up`). Without clang or BPF it falls back to pfifo_fast (same priomap, band 0 first, but
# no per-band counters). `status` prints the counters (`tc -s`): class 10:1 / qdisc 11:
# should carry packets during a `--source lazy://` restore.
#
# Environment: RATE (default 1gbit), DELAY_US (500), TARGET_PORT (7070), PROXY_PORT (7071),
# QUEUE_MS (5).
set -euo pipefail

SRC=lr-src
DST=lr-dst
RATE=${RATE:-1gbit}
DELAY_US=${DELAY_US:-500}
TARGET_PORT=${TARGET_PORT:-7070}
PROXY_PORT=${PROXY_PORT:-7071}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUEUE_MS=${QUEUE_MS:-5}
PIDFILE=/run/lr-netns-proxy.pid

# The proxy uses std only: compile the one file with rustc, so the rig neither waits for the
# workspace's cargo lock nor depends on the rest of the crate compiling at the moment.
proxy_bin() {
  local src=$ROOT/crates/lazy-restore-core/examples/delay_proxy.rs
  local bin=${CARGO_TARGET_DIR:-$ROOT/target}/netns-link/delay_proxy
  if [ ! -x "$bin" ] || [ "$src" -nt "$bin" ]; then
    mkdir -p "$(dirname "$bin")"
    rustc --edition 2021 -O -o "$bin.tmp" "$src" >&2
    mv -f "$bin.tmp" "$bin"
  fi
  echo "$bin"
}

# RATE (tc syntax: 1gbit, 500mbit, 10mbit, 100kbit, or bit/s) in bits per second.
rate_bps() {
  local r=${1,,}
  case $r in
    *gbit) echo $(( ${r%gbit} * 1000000000 )) ;;
    *mbit) echo $(( ${r%mbit} * 1000000 )) ;;
    *kbit) echo $(( ${r%kbit} * 1000 )) ;;
    *bit) echo "${r%bit}" ;;
    *) echo "netns-link: RATE=$1: use Ngbit, Nmbit, Nkbit or Nbit" >&2; return 1 ;;
  esac
}

# The band-0 classifier: cls_bpf in classid mode (-1: the filter's classid, 0: no match).
urgent_obj() {
  local obj=${CARGO_TARGET_DIR:-$ROOT/target}/netns-link/urgent-prio.o
  command -v clang >/dev/null || return 1
  mkdir -p "$(dirname "$obj")"
  clang -O2 -target bpf -I"/usr/include/$(uname -m)-linux-gnu" -x c -c -o "$obj" - >&2 <<'EOF_BPF' || return 1
#include <linux/bpf.h>
__attribute__((section("classifier"), used)) int urgent(struct __sk_buff *skb)
{
	return skb->priority == 6 || skb->priority == 7 ? -1 : 0;
}
char _license[] __attribute__((section("license"), used)) = "GPL";
EOF_BPF
  echo "$obj"
}

# tbf at RATE; below it band 0 (SO_PRIORITY 6/7) strictly before band 1 (see the top).
shape() {
  local ns=$1 dev=$2 limit obj
  limit=$(( $(rate_bps "$RATE") / 8 * QUEUE_MS / 1000 ))
  tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true
  # burst sized for 1 Gbit at a 1 ms timer
  tc -n "$ns" qdisc add dev "$dev" root handle 1: tbf rate "$RATE" burst 256kb latency "${QUEUE_MS}ms"
  if obj=$(urgent_obj) &&
    tc -n "$ns" qdisc add dev "$dev" parent 1:1 handle 10: htb default 2 r2q 1000 &&
    tc -n "$ns" class add dev "$dev" parent 10: classid 10:1 htb rate 10gbit burst 256kb cburst 256kb quantum 60000 prio 0 &&
    tc -n "$ns" class add dev "$dev" parent 10: classid 10:2 htb rate 10gbit burst 256kb cburst 256kb quantum 60000 prio 1 &&
    tc -n "$ns" qdisc add dev "$dev" parent 10:1 handle 11: bfifo limit "$limit" &&
    tc -n "$ns" qdisc add dev "$dev" parent 10:2 handle 12: bfifo limit "$limit" &&
    tc -n "$ns" filter add dev "$dev" parent 10: pref 1 bpf obj "$obj" sec classifier classid 10:1; then
    return 0
  fi
  echo "netns-link: no eBPF classifier; pfifo_fast under the tbf instead (band 0 first, no per-band counters)" >&2
  tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true
  tc -n "$ns" qdisc add dev "$dev" root handle 1: tbf rate "$RATE" burst 256kb latency "${QUEUE_MS}ms"
  tc -n "$ns" qdisc add dev "$dev" parent 1:1 handle 10: pfifo_fast
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
  # RATE each way, urgent (SO_PRIORITY 6) packets first
  shape $SRC lr-veth-s
  shape $DST lr-veth-d
  local bin
  bin=$(proxy_bin)
  ip netns exec $DST "$bin" 127.0.0.1:$PROXY_PORT 10.200.0.1:$TARGET_PORT "$DELAY_US" \
    >/run/lr-netns-proxy.log 2>&1 &
  echo $! >$PIDFILE
  # it prints its banner once bound: return only when clients can connect
  local i
  for i in $(seq 100); do
    grep -q '^delay_proxy: ' /run/lr-netns-proxy.log 2>/dev/null && break
    kill -0 "$(cat $PIDFILE)" 2>/dev/null || { cat /run/lr-netns-proxy.log >&2; exit 1; }
    sleep 0.05
  done
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
  local pair
  for pair in "$SRC lr-veth-s" "$DST lr-veth-d"; do
    set -- $pair
    [ -e "/run/netns/$1" ] || continue
    echo "$1 $2 (band 0 = class 10:1 / qdisc 11: carries SO_PRIORITY 6 and 7):"
    tc -n "$1" -s qdisc show dev "$2" 2>/dev/null | sed 's/^/  /' || true
    tc -n "$1" -s class show dev "$2" parent 10: 2>/dev/null | sed 's/^/  /' || true
  done
  if [ -f $PIDFILE ] && kill -0 "$(cat $PIDFILE)" 2>/dev/null; then
    echo "delay proxy pid $(cat $PIDFILE)"
  else
    echo "no delay proxy"
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
