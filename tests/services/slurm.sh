#!/usr/bin/env bash
# A single-node SLURM cluster whose whole state lives in one folder, for tests.
#
#   tests/services/slurm.sh DIR        start munged, slurmctld and slurmd; wait until the node is idle;
#                                      print what a client needs, one NAME=VALUE a line: SLURM_CONF, PATH (with
#                                      DIR/bin, the sacct stand-in, first), SLURM_PARTITION, SLURM_NODE
#   tests/services/slurm.sh stop DIR   cancel the cluster's jobs and stop every daemon started in DIR
#
# Needs the Debian packages slurm-wlm and munge (slurmctld, slurmd, munged, mungekey, sinfo, squeue, scancel).
# Nothing outside DIR is written: the munge key, socket and log, slurm.conf, state, spool, logs and pid files
# are all in it. The daemons run as the calling user (root included). Ports: SLURM_TEST_PORT (slurmctld) and
# SLURM_TEST_PORT+1 (slurmd), default two free ones. The partition is named "debug" (Default=YES).
# Logs: DIR/log/{munged,slurmctld,slurmd}.log (slurmctld's and slurmd's foreground output: *.out).
set -euo pipefail

die() { echo "slurm.sh: $*" >&2; exit 1; }

stop() {
    local dir=$1
    [[ -d $dir ]] || return 0
    if [[ -f $dir/slurm.conf ]] && [[ -f $dir/pid/slurmctld.pid ]]; then
        # Jobs' processes belong to slurmstepd, which outlives slurmd: cancel them while slurmd still runs.
        SLURM_CONF=$dir/slurm.conf timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z $(SLURM_CONF=$dir/slurm.conf timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    local file pid
    for file in slurmd.pid slurmd.pid.launch slurmctld.pid slurmctld.pid.launch munged.pid; do
        [[ -f $dir/pid/$file ]] || continue
        pid=$(cat "$dir/pid/$file")
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/pid/$file"
    done
}

free_port_pair() {  # a port P with P and P+1 both free
    local p
    for _ in $(seq 50); do
        p=$(( 20000 + RANDOM % 30000 ))
        if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && ! (exec 3<>/dev/tcp/127.0.0.1/$((p + 1))) 2>/dev/null; then
            echo "$p"; return
        fi
    done
    die "no free port pair found"
}

if [[ ${1:-} == stop ]]; then
    [[ -n ${2:-} ]] || die "usage: $0 stop DIR"
    stop "$(realpath "$2")"
    exit 0
fi
[[ -n ${1:-} ]] || die "usage: $0 DIR | $0 stop DIR"
for tool in munged mungekey slurmctld slurmd sinfo squeue scancel; do
    command -v "$tool" >/dev/null \
        || die "$tool not on PATH (apt-get install -y --no-install-recommends slurm-wlm munge)"
done

mkdir -p "$1"
dir=$(realpath "$1")
user=$(id -un)
host=$(hostname -s)
mkdir -p "$dir"/{munge,state,spool,log,pid}
trap 'rc=$?; ((rc == 0)) || stop "$dir"' EXIT  # a start that fails leaves nothing running
chmod 700 "$dir/munge"

# --- munge: a fresh key, a private socket -----------------------------------------------------------------
key=$dir/munge/munge.key
if [[ ! -f $key ]]; then
    mungekey --create --keyfile="$key" 2>/dev/null || dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
fi
chmod 400 "$key"
socket=$dir/munge/munge.socket
# --force: munged otherwise refuses a key, socket or log in a folder it does not consider secure (group- or
# world-writable parents such as /tmp, or owned by another user). It forks and writes its pid file itself.
munged --force --socket="$socket" --key-file="$key" --pid-file="$dir/pid/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" --num-threads=2 \
    || die "munged did not start: $(tail -n 5 "$dir/log/munged.log" 2>/dev/null)"
for _ in $(seq 50); do [[ -S $socket ]] && break; sleep 0.1; done
[[ -S $socket ]] || die "munged socket $socket did not appear: $(tail -n 5 "$dir/log/munged.log" 2>/dev/null)"

# --- slurm.conf ----------------------------------------------------------------------------------------------
port=${SLURM_TEST_PORT:-$(free_port_pair)}
# This machine's CPUs, sockets, cores, threads and memory as slurmd itself detects them.
node_hw=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //')
[[ $node_hw == *CPUs=* ]] || die "slurmd -C did not describe the node: $node_hw"
conf=$dir/slurm.conf
cat >"$conf" <<EOF
ClusterName=harness
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/pid/slurmctld.pid
SlurmdPidFile=$dir/pid/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=2
MinJobAge=3600
MaxJobCount=10000
NodeName=$host NodeAddr=127.0.0.1 $node_hw State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$conf

# --- sacct ---------------------------------------------------------------------------------------------------
# Without accounting (slurmdbd and a database) the real sacct only says "Slurm accounting storage is disabled",
# and submitit, which polls `sacct -o JobID,State,NodeList --parsable2 -j ID ...`, then never learns that a job
# ended without a result (cancelled, killed): it waits for it forever. This stand-in answers that query from
# slurmctld's memory (squeue --states=all lists ended jobs for MinJobAge seconds). Clients put DIR/bin first on
# PATH (printed below).
mkdir -p "$dir/bin"
cat >"$dir/bin/sacct" <<'SACCT'
#!/usr/bin/env bash
# sacct stand-in for an accounting-less test cluster: "JobID|State|NodeList" of the jobs named with -j.
export SLURM_CONF=${SLURM_CONF:-$(dirname "$(realpath "$0")")/../slurm.conf}
ids=()
while (($#)); do
    case $1 in
        -j|--jobs) ids+=("$2"); shift 2 ;;
        -j*) ids+=("${1#-j}"); shift ;;
        --jobs=*) ids+=("${1#--jobs=}"); shift ;;
        *) shift ;;
    esac
done
echo "JobID|State|NodeList"
((${#ids[@]})) || exit 0
list=$(IFS=,; echo "${ids[*]}")
squeue --noheader --states=all --jobs="$list" --format="%i|%T|%N" 2>/dev/null || true
SACCT
chmod +x "$dir/bin/sacct"

# --- daemons -------------------------------------------------------------------------------------------------
# -D: foreground, in the background of this script (they outlive it); -i: ignore state of an earlier start.
nohup slurmctld -D -i -f "$conf" >"$dir/log/slurmctld.out" 2>&1 </dev/null &
ctld=$!
echo $ctld >"$dir/pid/slurmctld.pid.launch"
for _ in $(seq 100); do
    timeout 5 sinfo -h >/dev/null 2>&1 && break
    kill -0 $ctld 2>/dev/null || break  # it exited
    sleep 0.2
done
if ! timeout 5 sinfo -h >/dev/null 2>&1; then
    err=$(tail -n 15 "$dir/log/slurmctld.log" "$dir/log/slurmctld.out" 2>/dev/null)
    die "slurmctld did not answer (within 20 s, or it exited):
$err"
fi
nohup slurmd -D -f "$conf" -N "$host" >"$dir/log/slurmd.out" 2>&1 </dev/null &
slurmd_pid=$!
echo $slurmd_pid >"$dir/pid/slurmd.pid.launch"
state=
for _ in $(seq 150); do
    state=$(timeout 5 sinfo -h -N -n "$host" -o %t 2>/dev/null || true)
    [[ $state == idle ]] && break
    kill -0 $slurmd_pid 2>/dev/null || { state="$state, slurmd exited"; break; }
    sleep 0.2
done
if [[ $state != idle ]]; then
    err=$(tail -n 15 "$dir/log/slurmd.log" "$dir/log/slurmd.out" "$dir/log/slurmctld.log" 2>/dev/null)
    die "node $host is '${state:-unknown}', not idle (within 30 s):
$err"
fi
# Foreground daemons write their own pid files too; keep the launch pid where they did not.
for name in slurmctld slurmd; do
    [[ -s $dir/pid/$name.pid ]] || mv "$dir/pid/$name.pid.launch" "$dir/pid/$name.pid"
    rm -f "$dir/pid/$name.pid.launch"
done

echo "SLURM_CONF=$conf"
echo "PATH=$dir/bin:$PATH"
echo "SLURM_PARTITION=debug"
echo "SLURM_NODE=$host"
