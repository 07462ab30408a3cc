#!/usr/bin/env bash
# edgeproxy in one minute: the real agent loop against a built-in example cluster, inside
# throwaway network namespaces (a node, a pod, two backends, and a kube-proxy-like KUBE-SERVICES
# chain for a filtered service). Sends real traffic through ClusterIPs, shows which backend
# answered and the rules installed, then removes everything it made.
#
#   sudo tests/demo.sh
#
# Nothing outside the namespaces it creates is changed: no iptables rule, route or address of
# this machine is touched.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "demo: run as root (it builds network namespaces): sudo tests/demo.sh" >&2
  exit 2
fi

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "build"
tests/setup.sh >/dev/null
cargo build -q --bin edgeproxy
BIN=$PWD/target/debug/edgeproxy

P=epdemo$$
NODE=$P-node POD=$P-pod BE1=$P-be1 BE2=$P-be2 CLOUD=$P-cloud
WORK=$(mktemp -d)
AGENT_PID=
cleanup() {
  local status=$?
  set +e
  if [ "$status" != 0 ] && [ -s "$WORK/agent.log" ]; then
    echo "demo failed (exit $status); the agent's log:"; sed 's/^/  agent| /' "$WORK/agent.log"
  fi
  disown -a 2>/dev/null
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null
  for ns in $NODE $POD $BE1 $BE2 $CLOUD; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

say "topology: node <-> pod, backend-1, backend-2, cloud (all namespaces)"
for ns in $NODE $POD $BE1 $BE2 $CLOUD; do ip netns add "$ns"; inns "$ns" ip link set lo up; done
i=0
for peer in $POD $BE1 $BE2 $CLOUD; do
  ip link add "$P-n$i" type veth peer name "$P-p$i"
  ip link set "$P-n$i" netns "$NODE"; ip link set "$P-p$i" netns "$peer"
  inns "$NODE" ip addr add "10.244.$i.1/24" dev "$P-n$i"; inns "$NODE" ip link set "$P-n$i" up
  inns "$peer" ip addr add "10.244.$i.10/24" dev "$P-p$i"; inns "$peer" ip link set "$P-p$i" up
  inns "$peer" ip route add default via "10.244.$i.1"
  i=$((i + 1))
done
inns "$NODE" sysctl -qw net.ipv4.ip_forward=1
# The node's uplink is the "cloud" link, as on a real edge node: local processes need a route for
# ClusterIPs to be sent at all (the nat OUTPUT hook sees packets only after a route was found).
inns "$NODE" ip route add default via 10.244.3.10
# Backends: an HTTP answer and a UDP echo that both say who they are.
for who in backend-1 backend-2 cloud; do
  cat > "$WORK/http-$who" <<EOF
#!/bin/sh
# Read the request head, then answer.
while read -r line; do [ "\$(printf '%s' "\$line" | tr -d '\r')" = "" ] && break; done
printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from $who\n'
EOF
  cat > "$WORK/udp-$who" <<EOF
#!/bin/sh
read -r q
printf '$who answers: %s\n' "\$q"
EOF
  chmod +x "$WORK/http-$who" "$WORK/udp-$who"
done
for b in 1 2; do
  ns=$BE1; [ $b = 2 ] && ns=$BE2
  ip netns exec "$ns" socat TCP-LISTEN:8080,fork,reuseaddr EXEC:"$WORK/http-backend-$b" &
  ip netns exec "$ns" socat UDP-RECVFROM:5353,fork EXEC:"$WORK/udp-backend-$b" &
done
ip netns exec "$CLOUD" socat TCP-LISTEN:8080,fork,reuseaddr EXEC:"$WORK/http-cloud" &

say "a kube-proxy-like KUBE-SERVICES chain in the node (for the filtered service), installed first"
inns "$NODE" iptables -t nat -N KUBE-SERVICES
inns "$NODE" iptables -t nat -A KUBE-SERVICES -d 10.96.0.90/32 -p tcp --dport 80 -j DNAT --to-destination 10.244.3.10:8080
inns "$NODE" iptables -t nat -I PREROUTING 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
inns "$NODE" iptables -t nat -I OUTPUT 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES

cat > "$WORK/cluster.json" <<'JSON'
{"kind": "List", "apiVersion": "v1", "items": [
 {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "web", "namespace": "demo"},
  "spec": {"clusterIP": "10.96.0.80", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
 {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "echo", "namespace": "demo"},
  "spec": {"clusterIP": "10.96.0.53", "ports": [{"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353}]}},
 {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "cloud-only", "namespace": "demo",
   "labels": {"service.edgemesh.kubeedge.io/service-proxy-name": ""}},
  "spec": {"clusterIP": "10.96.0.90", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
 {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "nobody-home", "namespace": "demo"},
  "spec": {"clusterIP": "10.96.0.99", "ports": [{"name": "http", "port": 80}]}},
 {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
  "metadata": {"name": "web-x1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
  "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
  "endpoints": [{"addresses": ["10.244.1.10"], "conditions": {"ready": true}, "nodeName": "demo-node"},
                {"addresses": ["10.244.2.10"], "conditions": {"ready": true}, "nodeName": "demo-node"}]},
 {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
  "metadata": {"name": "echo-x1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "echo"}},
  "addressType": "IPv4", "ports": [{"name": "dns", "protocol": "UDP", "port": 5353}],
  "endpoints": [{"addresses": ["10.244.1.10"], "conditions": {"ready": true}},
                {"addresses": ["10.244.2.10"], "conditions": {"ready": true}}]}
]}
JSON
inns "$NODE" iptables-save -t nat > "$WORK/before.txt" 2>/dev/null

say "what edgeproxy will do with this cluster (a dry run, touches nothing)"
run "$BIN" rules --from "$WORK/cluster.json" --kube-proxy present --explain

say "start the agent in the node: edgeproxy run --source file:cluster.json"
ip netns exec "$NODE" "$BIN" --log-level "${LOG_LEVEL:-info}" run --source "file:$WORK/cluster.json" --node-name demo-node \
  --metrics-address 127.0.0.1:10551 --run-dir "$WORK/run" --state-dir "$WORK/state" 2> "$WORK/agent.log" &
AGENT_PID=$!
for _ in $(seq 1 100); do
  inns "$NODE" curl -sf -o /dev/null http://127.0.0.1:10551/readyz && break
  sleep 0.1
done
if ! inns "$NODE" curl -sf -o /dev/null http://127.0.0.1:10551/readyz; then
  echo "the agent did not become ready; its log:"; cat "$WORK/agent.log"; exit 1
fi
sed 's/^/  agent| /' "$WORK/agent.log"

say "the rules it installed (its jumps come first, ahead of KUBE-SERVICES)"
inns "$NODE" iptables -t nat -S PREROUTING 2>/dev/null
inns "$NODE" iptables -t nat -S OUTPUT 2>/dev/null
inns "$NODE" iptables -t nat -S KUBE-PORTALS-CONTAINER 2>/dev/null
inns "$NODE" iptables -t nat -S EDGEPROXY-NO-ENDPOINTS 2>/dev/null

say "TCP from a local process on the node (OUTPUT path): round robin over two backends"
for _ in 1 2 3 4; do inns "$NODE" curl -sS --max-time 3 http://10.96.0.80/; done
say "TCP from a pod (PREROUTING path)"
for _ in 1 2; do inns "$POD" curl -s --max-time 3 http://10.96.0.80/; done
say "UDP from the pod to demo/echo (53/UDP)"
for q in ping pong; do echo "$q" | inns "$POD" socat -t 2 - UDP:10.96.0.53:53; done
say "the filtered service goes to kube-proxy's chain, not to edgeproxy"
inns "$POD" curl -s --max-time 3 http://10.96.0.90/
say "a service without endpoints is refused at once"
inns "$POD" curl -sS --max-time 3 http://10.96.0.99/ 2>&1 | sed 's/^/  /' || true

say "metrics (excerpt)"
inns "$NODE" curl -s http://127.0.0.1:10551/metrics | grep -E '^edgeproxy_(connections_total\{service="demo/web|rule_syncs_total\{result="ok"|udp_flow_events_total|bytes_total\{service="demo/web)' || true

say "stop the agent (SIGTERM): it removes everything it installed"
kill "$AGENT_PID"; wait "$AGENT_PID" || true; AGENT_PID=
inns "$NODE" iptables-save -t nat > "$WORK/after.txt" 2>/dev/null
if diff <(grep -v '^#' "$WORK/before.txt") <(grep -v '^#' "$WORK/after.txt"); then
  echo "nat table after exit == nat table before start"
else
  echo "the nat table differs after exit (see above)"; exit 1
fi
say "done; removing the namespaces"
