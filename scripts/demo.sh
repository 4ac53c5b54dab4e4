#!/usr/bin/env bash
# The celery-supervise demo, in one command, on the embedded filesystem broker.
#
# Starts supervisord with conf/supervisord.conf (which includes
# conf/conf.d/celery.conf: the demo worker of django_app/ and the
# eventlistener, as print-config prints them), runs two tasks that each start plain, nohup'd and setsid'd
# children, shows the tree as celery-supervise sees it, runs
# scripts/deploy.sh, and shows which children were killed and which were
# spared. Then it shuts the new supervisord down and kills the spared demo
# processes by PID, so nothing is left running, also when a step fails.
#
# Needs the project installed in the Python first on PATH; from the
# repository root:
#   python3 -m venv .venv && .venv/bin/pip install -e '.[django]'
#   PATH="$PWD/.venv/bin:$PATH" scripts/demo.sh
# It works from any directory. Files go to var/ at the repository root,
# where conf/supervisord.conf keeps its socket and logs; the demo's broker,
# task markers and state file go to var/demo/, emptied on every run.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
conf=$root/conf/supervisord.conf
var=$root/var
work=$var/demo
install_hint="python3 -m venv .venv && .venv/bin/pip install -e '.[django]', then PATH=\"\$PWD/.venv/bin:\$PATH\" scripts/demo.sh"

if [ -t 1 ]; then bold=$'\e[1m' plain=$'\e[0m'; else bold='' plain=''; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }
say() { printf 'demo: %s\n' "$*"; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

for tool in python3 supervisord supervisorctl celery celery-supervise; do
  command -v "$tool" >/dev/null || die "$tool is not on PATH; install the project first: $install_hint"
done
python=$(command -v python3)
"$python" -c 'import celery_supervise, django' 2>/dev/null \
  || die "$python cannot import celery_supervise and django; install the project first: $install_hint"

ctl() { supervisorctl -c "$conf" "$@"; }
supervisord_pid() {  # the PID of the supervisord answering on conf's socket
  local pid
  pid=$(ctl pid 2>/dev/null) && [[ "$pid" =~ ^[0-9]+$ ]] && echo "$pid"
}
# proc_stat and still_running are kept in step with scripts/deploy.sh, which
# stays a single file so that users can copy it into their deploy alone.
# "STATE STARTTIME" of a process (fields 3 and 22 of /proc/PID/stat).
proc_stat() {
  local line fields
  read -r line 2>/dev/null <"/proc/$1/stat" || return 1
  read -ra fields <<<"${line##*) }"
  printf '%s %s\n' "${fields[0]}" "${fields[19]}"
}
# True while the process PID that started at START runs (a zombie has exited).
still_running() {
  local now
  now=$(proc_stat "$1") || return 1
  [ "${now%% *}" != Z ] && [ "${now#* }" = "$2" ]
}

if pid=$(supervisord_pid); then
  die "a supervisord of conf/supervisord.conf is already running (PID $pid); stop it first: supervisorctl -c $conf shutdown"
fi

# The embedded default: the filesystem broker, in a folder of our own.
unset CELERY_BROKER_URL
export CELERY_SUPERVISE_BROKER_DIR=$work/broker
export CELERY_SUPERVISE_JOURNAL_DIR=$work/journal  # the workers' task journal, for requeue
export PYTHON=$python  # for scripts/deploy.sh
mkdir -p "$var"
chmod 700 "$var"
rm -rf "$work"
mkdir -p "$work"
started=$(date +%s)

stop_supervisord() {
  local pid start i
  pid=$(supervisord_pid) || return 0
  start=$(proc_stat "$pid") || return 0
  start=${start#* }
  say "shutting down supervisord (PID $pid); an idle worker takes about 5 s to stop"
  ctl shutdown >/dev/null || true
  for ((i = 0; i < 600; i++)); do  # 60 s: the worker's stopwaitsecs is 30
    still_running "$pid" "$start" || { say "supervisord has exited"; return 0; }
    sleep 0.1
  done
  say "supervisord (PID $pid) is still running after 60 s; stop it with: supervisorctl -c $conf shutdown" >&2
  return 1
}

cleaned=
cleanup() {
  [ -z "$cleaned" ] || return 0
  cleaned=1
  step "cleaning up: supervisord and the demo processes still alive"
  local rc=0
  stop_supervisord || rc=1
  "$python" "$root/scripts/demo_tasks.py" cleanup "$work" || rc=1
  return "$rc"
}
on_exit() {
  local rc=$?
  if [ -z "$cleaned" ]; then
    say "failed (exit $rc); cleaning up" >&2
    cleanup || true
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

step "1. starting supervisord -c conf/supervisord.conf (socket and logs in var/)"
supervisord -c "$conf"
for ((i = 0; i < 200; i++)); do
  if pid=$(supervisord_pid); then break; fi
  sleep 0.1
done
pid=$(supervisord_pid) || die "supervisord did not answer within 20 s; see $var/supervisord.log"
say "supervisord is running (PID $pid)"

step "2. waiting for the Celery worker to answer a ping"
"$python" "$root/scripts/demo_tasks.py" wait-ready --timeout 60

step "3. two tasks, each starting plain, nohup'd and setsid'd children"
"$python" "$root/scripts/demo_tasks.py" start "$work" --count 2 --hold 8

step "4. the tree, as celery-supervise sees it: celery-supervise -A demo status"
(cd "$root/django_app" && celery-supervise -A demo status)

step "5. the deploy: scripts/deploy.sh -c conf/supervisord.conf -A demo -g 5"
(cd "$root/django_app" && "$root/scripts/deploy.sh" -c "$conf" -A demo -g 5 -s "$work/state.json")

step "6. what became of the tasks' children"
if grep -q '^\[eventlistener:celery-worker-supervise\]' "$root/conf/conf.d/celery.conf"; then
  say "conf/conf.d/celery.conf also runs celery-supervise's eventlistener, which reaps a worker's leftovers"
  say "as soon as it has stopped; what it killed, the deploy's kill then found already gone."
  "$python" "$root/scripts/demo_tasks.py" listener-log "$var/celery-worker-supervise.log" --since "$started"
fi
"$python" "$root/scripts/demo_tasks.py" report "$work"

cleanup
step "done: nothing of the demo is left running; logs are in var/, the state file is var/demo/state.json"
