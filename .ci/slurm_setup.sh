#!/usr/bin/env bash
# A one-node SLURM cluster with job accounting on localhost, for `make test-slurm`
# (tests/slurm/test_slurm_quick.py runs the quick pipeline through snakemake-executor-plugin-slurm).
#
#   sudo .ci/slurm_setup.sh        # Debian 12 / Ubuntu, as root, no systemd needed
#
# What it does (each step is skipped when already done, so it is safe to run again):
#   1. apt-get installs munge, mariadb-server, slurmdbd, slurmctld, slurmd, slurm-client (Slurm 22.05 on
#      Debian 12), without letting the packages start services.
#   2. starts munged (the authentication every Slurm daemon and command uses).
#   3. starts MariaDB and creates the accounting database and its user.
#   4. writes /etc/slurm/slurmdbd.conf and /etc/slurm/slurm.conf (one node: this host, with the CPUs and
#      memory `slurmd -C` reports; one default partition; accounting through slurmdbd, job comments kept).
#   5. starts slurmdbd, registers the cluster, an account and root's association in it.
#   6. starts slurmctld and slurmd, waits for the node to be idle.
#   7. submits one job with sbatch and waits until `sacct` reports it COMPLETED.
#
# Why slurmdbd (and so MariaDB): the plugin polls job states with `sacct` whenever the binary exists
# (it always does: slurm-client ships it). With AccountingStorageType=accounting_storage/none, sacct
# exits 1 with "Slurm accounting storage is disabled", and jobcomp/filetxt only feeds `sacct -c`, which the
# plugin never calls. slurmdbd stores accounting only in MySQL/MariaDB (its sole StorageType). See docs/slurm.md.
#
# Names can be changed through the environment: MOE_SLURM_CLUSTER (moeci), MOE_SLURM_PARTITION (ci),
# MOE_SLURM_ACCOUNT (moe_ci). It refuses to touch a slurm.conf it did not write.
set -euo pipefail

CLUSTER=${MOE_SLURM_CLUSTER:-moeci}
PARTITION=${MOE_SLURM_PARTITION:-ci}
ACCOUNT=${MOE_SLURM_ACCOUNT:-moe_ci}
DB_NAME=slurm_acct_db
DB_USER=slurm
# Local-only: MariaDB listens on 127.0.0.1 and its socket; this password guards nothing else.
DB_PASS=moe_ci_slurmdbd
MARKER="# Written by moe-whisper-sap .ci/slurm_setup.sh; rerunning the script rewrites it."
PACKAGES=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client)
SLURM_CONF=/etc/slurm/slurm.conf
SLURMDBD_CONF=/etc/slurm/slurmdbd.conf
LOG_DIR=/var/log/slurm
START=$(date +%s)

say() { echo "[slurm_setup $(($(date +%s) - START))s] $*"; }
die() {
    echo "[slurm_setup] ERROR: $*" >&2
    for f in "$LOG_DIR"/slurmdbd.log "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd.log /var/log/mysql/error.log; do
        [ -s "$f" ] && { echo "--- last lines of $f" >&2; tail -n 15 "$f" >&2; }
    done
    exit 1
}

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND once a second until it succeeds.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq "$seconds"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    die "$what did not come up within ${seconds}s"
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pidfile FILE NAME: stop a daemon this script started earlier (by its pid file), wait for it to exit.
stop_pidfile() {
    local file=$1 name=$2 pid
    pid_alive "$file" || return 0
    pid=$(cat "$file")
    say "stopping $name (pid $pid) to apply the new configuration"
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
    die "$name (pid $pid) did not stop within 30s"
}

[ "$(id -u)" = 0 ] || die "run as root: it installs packages, writes /etc/slurm and starts daemons (sudo $0)"
command -v apt-get >/dev/null || die "apt-get not found: this script sets up Slurm on Debian/Ubuntu only"

# ---- 1. packages -------------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} (apt-get)"
    # No systemd here: keep the packages' maintainer scripts from starting (or failing to start) services.
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
            > /tmp/slurm_setup_apt.log 2>&1
    }
    if ! apt_install; then
        say "apt-get install failed; running apt-get update and trying again"
        apt-get update -q > /tmp/slurm_setup_apt_update.log 2>&1 || {
            [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
            tail -n 20 /tmp/slurm_setup_apt_update.log >&2
            die "apt-get update failed (no package mirror reachable?); see /tmp/slurm_setup_apt_update.log"
        }
        apt_install || {
            [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
            tail -n 20 /tmp/slurm_setup_apt.log >&2
            die "apt-get install ${missing[*]} failed; see /tmp/slurm_setup_apt.log"
        }
    fi
    [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
else
    say "packages already installed: ${PACKAGES[*]}"
fi
say "versions: $(dpkg-query -W -f='${Package} ${Version}  ' slurmctld slurmdbd munge mariadb-server)"
mkdir -p "$LOG_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
chown slurm:slurm "$LOG_DIR" /var/lib/slurm/slurmctld

# ---- 2. munge ----------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running"
else
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 || die "munged failed to start (/var/log/munge/munged.log)"
    wait_for 20 "munged" sh -c 'munge -n | unmunge'
fi

# ---- 3. MariaDB --------------------------------------------------------------------------------------
mkdir -p /run/mysqld /var/log/mysql
chown mysql:mysql /run/mysqld /var/log/mysql
if [ ! -d /var/lib/mysql/mysql ]; then
    say "initialising the MariaDB data directory"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql > /tmp/slurm_setup_mariadb_install.log 2>&1 \
        || die "mariadb-install-db failed; see /tmp/slurm_setup_mariadb_install.log"
fi
if mysqladmin --silent ping >/dev/null 2>&1; then
    say "MariaDB already running"
else
    say "starting MariaDB (mariadbd, log /var/log/mysql/error.log)"
    setsid nohup mariadbd --user=mysql --log-error=/var/log/mysql/error.log </dev/null >/dev/null 2>&1 &
    wait_for 60 "MariaDB" mysqladmin --silent ping
fi
# root reaches the server through the unix socket (Debian's unix_socket authentication).
mysql --protocol=socket <<SQL || die "could not create the accounting database and user in MariaDB"
CREATE DATABASE IF NOT EXISTS ${DB_NAME};
CREATE USER IF NOT EXISTS '${DB_USER}'@'localhost' IDENTIFIED BY '${DB_PASS}';
ALTER USER '${DB_USER}'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL PRIVILEGES ON ${DB_NAME}.* TO '${DB_USER}'@'localhost';
FLUSH PRIVILEGES;
SQL
say "accounting database ${DB_NAME} and user ${DB_USER}@localhost ready"

# ---- 4. configuration --------------------------------------------------------------------------------
HOST=$(hostname -s)
# The node as slurmd sees it (CPUs, sockets, cores, threads), and 90 % of its memory, so a job can never
# ask for memory the node does not report.
NODE_LINE=$(slurmd -C | head -n 1)
NODE_HW=$(echo "$NODE_LINE" | sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=.*$//')
REAL_MB=$(echo "$NODE_LINE" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
[ -n "$REAL_MB" ] && [ -n "$NODE_HW" ] || die "could not read this node's CPUs and memory from 'slurmd -C': $NODE_LINE"
NODE_MB=$((REAL_MB * 9 / 10))

for conf in "$SLURM_CONF" "$SLURMDBD_CONF"; do
    if [ -e "$conf" ] && ! grep -qF "$MARKER" "$conf"; then
        die "$conf exists and was not written by this script: not touching a real cluster's configuration"
    fi
done

# write_if_changed FILE OWNER MODE: write stdin to FILE when it differs; returns 0 when it changed.
write_if_changed() {
    local file=$1 owner=$2 mode=$3 tmp
    tmp=$(mktemp)
    cat > "$tmp"
    if [ -e "$file" ] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
        return 1
    fi
    install -o "${owner%%:*}" -g "${owner##*:}" -m "$mode" "$tmp" "$file"
    rm -f "$tmp"
    say "wrote $file"
    return 0
}

dbd_changed=""
write_if_changed "$SLURMDBD_CONF" slurm:slurm 600 <<EOF && dbd_changed=1
$MARKER
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=/run/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF

ctl_changed=""
write_if_changed "$SLURM_CONF" root:root 644 <<EOF && ctl_changed=1
$MARKER
# One node (this host) for CI: no cgroups (proctrack/linuxproc, task/none), so it runs in a container or VM.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
MpiDefault=none
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Accounting: slurmdbd keeps every job (sacct), with the comment the plugin sets (rule and wildcards).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 $NODE_HW RealMemory=$NODE_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# ---- 5. slurmdbd, cluster, account -------------------------------------------------------------------
[ -n "$dbd_changed" ] && stop_pidfile /run/slurmdbd.pid slurmdbd
if pid_alive /run/slurmdbd.pid && sacctmgr -n list cluster >/dev/null 2>&1; then
    say "slurmdbd already running"
else
    say "starting slurmdbd (log $LOG_DIR/slurmdbd.log)"
    slurmdbd </dev/null >/dev/null 2>&1 || die "slurmdbd failed to start"
    wait_for 60 "slurmdbd" sacctmgr -n list cluster
fi
if sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    say "cluster $CLUSTER already registered in slurmdbd"
else
    say "registering cluster $CLUSTER in slurmdbd"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
fi
if sacctmgr -n -P list account "$ACCOUNT" format=account | grep -qx "$ACCOUNT"; then
    say "account $ACCOUNT exists"
else
    say "adding account $ACCOUNT"
    sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="moe-whisper-sap CI" Organization=ci >/dev/null \
        || die "sacctmgr add account $ACCOUNT failed"
fi
if sacctmgr -n -P list assoc where user=root account="$ACCOUNT" cluster="$CLUSTER" format=user | grep -qx root; then
    say "user root already in account $ACCOUNT"
else
    say "adding user root to account $ACCOUNT"
    sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null || die "sacctmgr add user root failed"
fi

# ---- 6. slurmctld and slurmd -------------------------------------------------------------------------
if [ -n "$ctl_changed" ]; then
    stop_pidfile /run/slurmd.pid slurmd
    stop_pidfile /run/slurmctld.pid slurmctld
fi
# A state directory left by a cluster of another name stops slurmctld from starting.
if [ -s /var/lib/slurm/slurmctld/clustername ] && [ "$(cat /var/lib/slurm/slurmctld/clustername)" != "$CLUSTER" ]; then
    say "clearing slurmctld state of another cluster name"
    rm -rf /var/lib/slurm/slurmctld/*
fi
if pid_alive /run/slurmctld.pid && scontrol ping 2>/dev/null | grep -q "is UP"; then
    say "slurmctld already running"
else
    say "starting slurmctld (log $LOG_DIR/slurmctld.log)"
    slurmctld </dev/null >/dev/null 2>&1 || die "slurmctld failed to start"
    wait_for 60 "slurmctld" sh -c 'scontrol ping | grep -q "is UP"'
fi
if pid_alive /run/slurmd.pid; then
    say "slurmd already running"
else
    say "starting slurmd (log $LOG_DIR/slurmd.log)"
    slurmd </dev/null >/dev/null 2>&1 || die "slurmd failed to start"
fi
node_ready() { sinfo -h -N -n "$HOST" -o %T | grep -Eq '^(idle|mixed|allocated|completing)$'; }
for _ in $(seq 60); do
    node_ready && break
    state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null || true)
    case "$state" in
        drain*|down) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
node_ready || die "node $HOST is not idle: $(sinfo -h -N -n "$HOST" -o '%T %E' 2>&1)"
say "node $HOST up: $NODE_HW RealMemory=${NODE_MB}MB, partition $PARTITION"

# ---- 7. end-to-end check: sbatch -> slurmd -> slurmdbd -> sacct ---------------------------------------
jobid=$(sbatch --parsable -A "$ACCOUNT" -p "$PARTITION" -J slurm_setup_check -o /dev/null -t 1 --mem 10 \
    --wrap "true") || die "sbatch of a test job failed"
jobid=${jobid%%;*}
check_done() { [ "$(sacct -X -n -P -j "$jobid" -o State 2>/dev/null | head -n 1)" = COMPLETED ]; }
for _ in $(seq 60); do check_done && break; sleep 1; done
check_done || die "test job $jobid did not show as COMPLETED in sacct within 60s: $(sacct -X -n -P -j "$jobid" -o State,Reason 2>&1)"
say "test job $jobid ran and sacct reports it COMPLETED: cluster $CLUSTER ready (partition $PARTITION, account $ACCOUNT)"
