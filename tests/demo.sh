#!/usr/bin/env bash
# bulkhead demo: a contractor workload next to production, kept apart by the
# kernel, with one audited bridge between them.
#
# Run it with `cargo xtask demo` (as root); that builds the agent and sets
# BULKHEAD_BIN. Running it directly works too:
#   sudo BULKHEAD_BIN=target/release/bulkhead bash tests/demo.sh
#
# What it builds, all of it private to the demo and removed on exit:
#   - network namespaces bh-demo-a and bh-demo-b joined by a veth pair:
#       bh-demo-a  10.250.0.1                the contractor's machine
#       bh-demo-b  10.250.0.2                production (a database on 5432, an API on 8080)
#                  10.250.0.3                a contractor build cache (9000)
#   - cgroups <cgroup2 mount>/bulkhead-demo/{contractor,prod,agent}
#   - pins under /sys/fs/bpf/bulkhead-demo, the agent's control socket in
#     /run/bulkhead-demo (and its audit store in /var/lib/bulkhead-demo, where
#     the agent keeps one)
# Traffic only ever goes between those two namespaces.
#
# Idempotent: a leftover of an interrupted run is cleaned up first.

set -euo pipefail

NS_A=bh-demo-a
NS_B=bh-demo-b
BPFFS_DIR=/sys/fs/bpf/bulkhead-demo
# The agent's defaults for that pin directory: control socket, audit store.
RUN_DIR=/run/bulkhead-demo
STATE_DIR=/var/lib/bulkhead-demo
CLIENT_IP=10.250.0.1
PROD_IP=10.250.0.2
CACHE_IP=10.250.0.3
DB_PORT=5432      # prod, not bridged: denied
API_PORT=8080     # prod, bridged for the contractor: allowed and audited
CACHE_PORT=9000   # contractor's own service: same domain, allowed

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN=${BULKHEAD_BIN:-$here/../target/release/bulkhead}

if [[ -t 1 ]]; then
    bold=$'\e[1m' green=$'\e[32m' red=$'\e[31m' dim=$'\e[2m' off=$'\e[0m'
else
    bold='' green='' red='' dim='' off=''
fi

heading() { printf '\n%s== %s ==%s\n' "$bold" "$*" "$off"; }
note() { printf '%s%s%s\n' "$dim" "$*" "$off"; }
die() {
    printf '%sdemo: %s%s\n' "$red" "$*" "$off" >&2
    exit 1
}
# Prints a command before running it, like `set -x` but readable.
show() { printf '%s$ %s%s\n' "$bold" "$*" "$off"; }

# ---------------------------------------------------------------- checks

[[ $(id -u) -eq 0 ]] || die "needs root (loads eBPF programs, creates cgroups and network namespaces)"
[[ -x $BIN ]] || die "agent binary $BIN not found: run \`cargo xtask demo\` or set BULKHEAD_BIN"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
for tool in ip nc socat curl; do
    command -v "$tool" >/dev/null || die "$tool is missing (cargo xtask setup installs it)"
done
if command -v jq >/dev/null; then
    pretty() { jq .; }
elif command -v python3 >/dev/null; then
    pretty() { while IFS= read -r line; do python3 -m json.tool <<<"$line"; done; }
else
    pretty() { cat; }
fi

# The cgroup v2 mount: the line of /proc/self/mountinfo whose type (after
# " - ") is cgroup2; field 5 is the mount point.
CG_MOUNT=$(awk '{ for (i = 1; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup2") { print $5; exit } break } }' /proc/self/mountinfo)
[[ -n $CG_MOUNT ]] || die "no cgroup v2 mount in /proc/self/mountinfo"
CG_REL=/bulkhead-demo   # as the policy names it: relative to the mount
CG=$CG_MOUNT$CG_REL

if [[ $(stat -f -c %T /sys/fs/bpf 2>/dev/null || true) != bpf_fs ]]; then
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf || die "no bpffs at /sys/fs/bpf and mounting one failed"
fi

# ---------------------------------------------------------------- cleanup

tmp=''
agent_pid=''

# Removes a cgroup and everything below it: kill its processes, then rmdir
# deepest first. Bounded: gives up after ~2 s per directory.
remove_cgroup_tree() {
    local dir=$1 sub _
    if [[ ! -d $dir ]]; then
        return 0
    fi
    for sub in "$dir"/*/; do
        if [[ -d $sub ]]; then
            remove_cgroup_tree "${sub%/}"
        fi
    done
    echo 1 >"$dir/cgroup.kill" 2>/dev/null || true
    for _ in $(seq 100); do
        if rmdir "$dir" 2>/dev/null || [[ ! -d $dir ]]; then
            return 0
        fi
        sleep 0.02
    done
    echo "demo: warning: could not remove cgroup $dir" >&2
}

cleanup() {
    local i
    # The agent first, politely, so it reports how many events it delivered.
    if [[ -n $agent_pid ]] && kill -0 "$agent_pid" 2>/dev/null; then
        kill -TERM "$agent_pid" 2>/dev/null || true
        for i in $(seq 50); do
            kill -0 "$agent_pid" 2>/dev/null || break
            sleep 0.1
        done
        if [[ -n $tmp && -f $tmp/agent.log ]]; then
            heading "The agent stopped"
            grep -vE ': enforcing |control: ' "$tmp/agent.log" || true
        fi
    fi
    # Everything left in the demo cgroups (servers, a leftover agent) dies here.
    remove_cgroup_tree "$CG"
    # Pinned links keep enforcing after the agent exits: detach removes them.
    if [[ -e $BPFFS_DIR ]]; then
        if [[ -n $tmp ]]; then
            show "bulkhead detach --force --bpffs-dir $BPFFS_DIR"
            "$BIN" detach --force --bpffs-dir "$BPFFS_DIR" || true
        else
            "$BIN" detach --force --bpffs-dir "$BPFFS_DIR" >/dev/null || true
        fi
    fi
    # The agent's control socket and audit store, named after the pin directory.
    rm -rf "$RUN_DIR" "$STATE_DIR"
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    if [[ -n $tmp ]]; then
        rm -rf "$tmp"
    fi
}

# Scratch directories of earlier runs that were killed before their cleanup.
remove_stale_scratch() {
    local d
    for d in /tmp/bulkhead-demo.??????; do
        if [[ -d $d && -O $d && ! -L $d ]]; then
            rm -rf "$d"
        fi
    done
}

leftover=no
if [[ -e $CG || -e $BPFFS_DIR || -e $RUN_DIR || -e $STATE_DIR ]] || ip netns list | grep -qE "^($NS_A|$NS_B)( |$)"; then
    leftover=yes
fi
cleanup
remove_stale_scratch
if [[ $leftover == yes ]]; then
    note "(removed what an earlier, interrupted demo left behind)"
fi
trap 'cleanup; note "cleaned up: namespaces, cgroups and pins removed"' EXIT
trap 'exit 130' INT TERM

tmp=$(mktemp -d /tmp/bulkhead-demo.XXXXXX)
events=$tmp/events.jsonl
agent_log=$tmp/agent.log
: >"$events"

# Runs a command inside a cgroup and a network namespace.
in_cg() {
    local cgroup=$1 ns=$2
    shift 2
    sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec ip netns exec "$@"' sh "$cgroup" "$ns" "$@"
}

# Waits (bounded, 5 s) until something listens on TCP ADDR:PORT in a namespace.
wait_listening() {
    local ns=$1 addr=$2 port=$3 i
    for i in $(seq 50); do
        if ip netns exec "$ns" ss -Hltn "src $addr:$port" | grep -q .; then
            return 0
        fi
        sleep 0.1
    done
    die "server on $addr:$port in $ns did not start"
}

# Prints the events that arrived after line $1 of the events log, waiting
# (bounded, 3 s) for at least one.
show_events_after() {
    local mark=$1 i
    for i in $(seq 30); do
        (($(wc -l <"$events") > mark)) && break
        sleep 0.1
    done
    sleep 0.2   # let events of the same connection arrive too
    if (($(wc -l <"$events") == mark)); then
        note "(no event)"
        return 0
    fi
    printf '%sevent:%s\n' "$bold" "$off"
    tail -n +"$((mark + 1))" "$events" | pretty
}

# ---------------------------------------------------------------- setup

heading "Setup: two network namespaces joined by a veth pair"
ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add bhdemo-a netns "$NS_A" type veth peer name bhdemo-b netns "$NS_B"
ip -n "$NS_A" link set lo up
ip -n "$NS_B" link set lo up
ip -n "$NS_A" addr add "$CLIENT_IP/24" dev bhdemo-a
ip -n "$NS_A" -6 addr add fd00:250::1/64 dev bhdemo-a nodad
ip -n "$NS_B" addr add "$PROD_IP/24" dev bhdemo-b
ip -n "$NS_B" addr add "$CACHE_IP/24" dev bhdemo-b
ip -n "$NS_B" -6 addr add fd00:250::2/64 dev bhdemo-b nodad
ip -n "$NS_A" link set bhdemo-a up
ip -n "$NS_B" link set bhdemo-b up
echo "$NS_A: $CLIENT_IP (contractor's machine)"
echo "$NS_B: $PROD_IP (production), $CACHE_IP (contractor build cache)"

heading "Setup: cgroups under $CG"
mkdir -p "$CG/contractor" "$CG/prod" "$CG/agent"
echo "$CG/contractor   domain contractor"
echo "$CG/prod         domain prod"
echo "$CG/agent        the agent itself (in no domain)"

heading "The policy"
policy=$tmp/policy.yaml
cat >"$policy" <<EOF
version: 1
mode: enforce
domains:
  contractor:
    cgroups: ["$CG_REL/contractor"]
    networks: [$CLIENT_IP/32, $CACHE_IP/32, "fd00:250::1/128"]
    audit: all        # log allowed connections too, not only denials
  prod:
    cgroups: ["$CG_REL/prod"]
    networks: [$PROD_IP/32, "fd00:250::2/128"]
bridges:
  - name: contractor-to-prod-api
    from: contractor
    to: prod
    ports: [tcp/$API_PORT]
    reason: "DEMO-1 contractor CI uploads build results to the prod API"
EOF
cat "$policy"
show "bulkhead check $policy"
"$BIN" check "$policy"

heading "Start the agent"
show "bulkhead run --policy $policy --cgroup-root $CG --bpffs-dir $BPFFS_DIR --events-log $events"
sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' sh "$CG/agent" \
    "$BIN" run --policy "$policy" --cgroup-root "$CG" --bpffs-dir "$BPFFS_DIR" \
    --events-log "$events" --no-stdout-events >"$agent_log" 2>&1 &
agent_pid=$!
disown "$agent_pid"
# Ready once it logs "enforcing" (the moment it also sends READY=1 to systemd).
for i in $(seq 150); do
    grep -q ': enforcing ' "$agent_log" && break
    if ! kill -0 "$agent_pid" 2>/dev/null; then
        cat "$agent_log" >&2
        die "the agent exited before it was ready"
    fi
    sleep 0.1
done
grep -q ': enforcing ' "$agent_log" || {
    cat "$agent_log" >&2
    die "the agent was not ready within 15 s"
}
cat "$agent_log"

# Servers: prod's database and API, and the contractor's build cache.
# A minimal HTTP responder: read the request headers, answer, close.
cat >"$tmp/http-reply.sh" <<'SCRIPT'
sed -u '/^\r*$/q' >/dev/null
printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from prod on port %s\n' "$1"
SCRIPT
for port in "$DB_PORT" "$API_PORT"; do
    in_cg "$CG/prod" "$NS_B" socat -T 5 "TCP-LISTEN:$port,bind=$PROD_IP,reuseaddr,fork" \
        EXEC:"sh $tmp/http-reply.sh $port" >/dev/null 2>&1 &
    disown $!
done
in_cg "$CG/contractor" "$NS_B" socat -T 5 "TCP-LISTEN:$CACHE_PORT,bind=$CACHE_IP,reuseaddr,fork" \
    SYSTEM:"echo hello from the contractor build cache" >/dev/null 2>&1 &
disown $!
wait_listening "$NS_B" "$PROD_IP" "$DB_PORT"
wait_listening "$NS_B" "$PROD_IP" "$API_PORT"
wait_listening "$NS_B" "$CACHE_IP" "$CACHE_PORT"
note "listening in $NS_B: prod $PROD_IP:$DB_PORT (database), prod $PROD_IP:$API_PORT (API), contractor $CACHE_IP:$CACHE_PORT (build cache)"

# ---------------------------------------------------------------- the show

failures=0
check() {
    if "$@"; then
        printf '%sas expected%s\n' "$green" "$off"
    else
        printf '%sUNEXPECTED%s\n' "$red" "$off"
        failures=$((failures + 1))
    fi
}

heading "1. Denied: contractor -> prod database ($PROD_IP:$DB_PORT, no bridge)"
mark=$(wc -l <"$events")
show "nc -v -z -w 2 $PROD_IP $DB_PORT    # in cgroup contractor, namespace $NS_A"
start=$(date +%s%N)
rc=0
out=$(in_cg "$CG/contractor" "$NS_A" nc -v -z -w 2 "$PROD_IP" "$DB_PORT" 2>&1) || rc=$?
ms=$((($(date +%s%N) - start) / 1000000))
echo "$out"
echo "exit status $rc after $ms ms: refused at connect(), no packet sent"
check grep -q "not permitted" <<<"$out"
show_events_after "$mark"

heading "2. Allowed, same domain: contractor -> contractor build cache ($CACHE_IP:$CACHE_PORT)"
mark=$(wc -l <"$events")
show "nc -v -w 2 $CACHE_IP $CACHE_PORT </dev/null    # in cgroup contractor, namespace $NS_A"
rc=0
out=$(in_cg "$CG/contractor" "$NS_A" nc -v -w 2 "$CACHE_IP" "$CACHE_PORT" </dev/null 2>&1) || rc=$?
echo "$out"
check grep -q "hello from the contractor build cache" <<<"$out"
show_events_after "$mark"

heading "3. Bridged: contractor -> prod API ($PROD_IP:$API_PORT, bridge contractor-to-prod-api)"
mark=$(wc -l <"$events")
show "curl -sS --max-time 5 http://$PROD_IP:$API_PORT/    # in cgroup contractor, namespace $NS_A"
rc=0
out=$(in_cg "$CG/contractor" "$NS_A" curl -sS --max-time 5 "http://$PROD_IP:$API_PORT/" 2>&1) || rc=$?
echo "$out"
check grep -q "hello from prod on port $API_PORT" <<<"$out"
show_events_after "$mark"

heading "4. Ask the running agent"
show "bulkhead explain --bpffs-dir $BPFFS_DIR --cgroup $CG_REL/contractor --dst $PROD_IP:$DB_PORT"
"$BIN" explain --bpffs-dir "$BPFFS_DIR" --cgroup "$CG_REL/contractor" --dst "$PROD_IP:$DB_PORT"
show "bulkhead explain --bpffs-dir $BPFFS_DIR --cgroup $CG_REL/contractor --dst $PROD_IP:$API_PORT"
"$BIN" explain --bpffs-dir "$BPFFS_DIR" --cgroup "$CG_REL/contractor" --dst "$PROD_IP:$API_PORT"
show "bulkhead events --bpffs-dir $BPFFS_DIR"
"$BIN" events --bpffs-dir "$BPFFS_DIR"
show "bulkhead status --bpffs-dir $BPFFS_DIR"
"$BIN" status --bpffs-dir "$BPFFS_DIR"

heading "5. Fail closed: kill -9 the agent, the policy stays in force"
show "kill -9 $agent_pid"
kill -9 "$agent_pid"
for _ in $(seq 50); do
    kill -0 "$agent_pid" 2>/dev/null || break
    sleep 0.1
done
show "nc -v -z -w 2 $PROD_IP $DB_PORT    # in cgroup contractor, namespace $NS_A"
rc=0
out=$(in_cg "$CG/contractor" "$NS_A" nc -v -z -w 2 "$PROD_IP" "$DB_PORT" 2>&1) || rc=$?
echo "$out"
check grep -q "not permitted" <<<"$out"
note "(enforcement is pinned under $BPFFS_DIR; a new \`bulkhead run\` adopts it, \`bulkhead detach\` removes it)"

heading "Done"
if ((failures > 0)); then
    cat "$agent_log"
    die "$failures step(s) did not behave as expected"
fi
echo "A denied, an allowed and a bridged connection, each decided in the kernel and recorded;"
echo "and the policy outlived the agent."
