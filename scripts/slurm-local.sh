#!/usr/bin/env bash
# slurm-local.sh: runs one command under a throwaway one-node Slurm on this machine, then
# stops it. It exists so that `srun` launches of loupe (ranks from PMIx through OpenMPI, as
# on a cluster) can be tried and tested without a cluster.
#
#   scripts/slurm-local.sh srun -n 2 --mpi=pmix build/loupe cache ...
#   scripts/slurm-local.sh --check      # exit 0 when a local Slurm can be started here
#
# Needs Debian's slurm-wlm (slurmctld, slurmd, srun) and munge, and root (slurmd starts the
# tasks as the submitting user, which only root may do for any user). Everything, the
# configuration, state, logs, munge's key and socket, lives in one temporary directory removed
# at the end: nothing is read from or written to /etc/slurm or /etc/munge, and the daemons
# listen on free ports of 127.0.0.1 only. Not for a machine that already runs Slurm: this is a
# second, private one.
#
# The command runs with SLURM_CONF pointing at the private configuration, so srun, sinfo and
# scancel find it; its exit status is this script's.
set -euo pipefail

check=0
if [ "${1:-}" = "--check" ]; then check=1; shift; fi
if [ $check -eq 0 ] && [ $# -eq 0 ]; then
    echo "usage: scripts/slurm-local.sh COMMAND [ARGS...] | --check" >&2
    exit 2
fi
for b in slurmctld slurmd srun sinfo squeue scancel munged mungekey; do
    if ! command -v "$b" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$b" ]; then
        echo "slurm-local: $b is not installed (apt-get install slurm-wlm munge)" >&2
        exit 3
    fi
done
if [ "$(id -u)" -ne 0 ]; then
    echo "slurm-local: must run as root (slurmd starts tasks as the submitting user)" >&2
    exit 3
fi
PATH="$PATH:/usr/sbin"

dir=$(mktemp -d /tmp/slurm-local-XXXXXX)
chmod 700 "$dir"
pids=()
# shellcheck disable=SC2317  # called by the trap
stop() {
    # the jobs first: a step whose slurmd went away first would linger (slurmstepd waits for it)
    if [ -n "${SLURM_CONF:-}" ] && [ ${#pids[@]} -ge 3 ]; then
        scancel --full --quiet --partition=local 2>/dev/null || true
        for _ in $(seq 100); do
            # each running step has a socket in slurmd's spool directory until its slurmstepd ends
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && [ -z "$(find "$dir/spool" -type s 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
    # then the daemons this script started, by their pids, last started first
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
        for _ in $(seq 150); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.1; done
        kill -9 "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    rm -rf "$dir"
}
trap stop EXIT
fail() {
    echo "slurm-local: $*" >&2
    for f in "$dir"/log/*.log; do [ -s "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
    exit 3
}

# two free TCP ports on 127.0.0.1 (the kernel picks them; taken again at once by the daemons)
read -r ctl_port node_port < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
host=$(hostname -s)
cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it answers OMP_NUM_THREADS
mkdir -p "$dir"/{state,spool,log,munge}
chmod 700 "$dir/munge"

# munge: Slurm's usual authentication, with its own key and socket
mungekey -c -k "$dir/munge/munge.key" >/dev/null 2>&1 || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" --pid-file="$dir/munge/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" 2>>"$dir/log/munged.log" || fail "munged did not start"
for _ in $(seq 50); do [ -s "$dir/munge/munged.pid" ] && break; sleep 0.1; done
pids+=("$(cat "$dir/munge/munged.pid")")

# OpenMPI 4 speaks PMIx; Slurm offers pmix where its plugin was built, else PMI-2
mpi=pmi2
# the smallest configuration one node needs: no cgroups (containers rarely allow them), no
# accounting, the processes tracked by their parent pids
cat >"$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctl_port
SlurmdPort=$node_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
export SLURM_CONF="$dir/slurm.conf"
srun --mpi=list 2>&1 | grep -q pmix && mpi=pmix
sed -i "s/^MpiDefault=none/MpiDefault=$mpi/" "$SLURM_CONF"

slurmctld -i -D >"$dir/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D >"$dir/log/slurmd.out" 2>&1 &
pids+=($!)
# the node is ready when the controller lists it idle
ready=0
for _ in $(seq 150); do
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || fail "a Slurm daemon ended at start"; done
    if sinfo -h -N -o '%T' 2>/dev/null | grep -q '^idle'; then ready=1; break; fi
    sleep 0.2
done
[ $ready -eq 1 ] || fail "the node did not come up within 30 s"
[ $check -eq 1 ] && exit 0
set +e
"$@"
rc=$?
set -e
exit $rc
