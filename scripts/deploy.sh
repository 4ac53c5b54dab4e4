#!/usr/bin/env bash
# Restart supervisord's Celery workers for a deploy, leaving no orphans.
#
# Replaces the old recipe
#     python manage.py celery savepid celery-worker-pid.txt
#     supervisorctl shutdown
#     kill -9 $(cat celery-worker-pid.txt)
#     supervisord
# with: savepid (whole trees, PID + creation time) -> supervisorctl shutdown ->
# wait for supervisord to exit -> kill (attached leftovers only; setsid'd and
# nohup'd descendants are spared) -> supervisord.
#
# Usage: scripts/deploy.sh -c SUPERVISORD_CONF (-A APP | -m MANAGE_PY) [options]
#   -c FILE      supervisord configuration (or $SUPERVISORD_CONF); supervisord
#                is started again with `supervisord -c FILE`, so the file must
#                not set nodaemon=true
#   -A APP       Celery app for `celery-supervise -A APP` (or $CELERY_APP)
#   -m FILE      use `python FILE celery ...` (the Django command) instead
#   -s FILE      state file (default: a fresh private temp dir)
#   -g SECONDS   grace between SIGTERM and SIGKILL for the leftovers (default 10)
#   -t SECONDS   how long supervisord may take to shut down (default 120)
#   -n           do not start supervisord again
#   -d           dry run: savepid and kill --dry-run only; stop nothing
# Run it from your project directory, as you would run `celery -A`. The
# Python is $PYTHON, else the first of: the one beside celery-supervise, the
# one beside supervisorctl, python3, that can import celery_supervise.
# Exit status: 0 done; non-zero when any step failed (3: something survived).
set -euo pipefail

prog=$(basename "$0")
conf=${SUPERVISORD_CONF:-}
app=${CELERY_APP:-}
manage=
state=
grace=10
shutdown_timeout=120
start_again=1
dry_run=

say() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() { say "error: $*"; exit 1; }
usage() {
  say "usage: $prog -c SUPERVISORD_CONF (-A APP | -m MANAGE_PY) [-s STATE] [-g GRACE] [-t TIMEOUT] [-n] [-d]"
  exit 2
}

while getopts "c:A:m:s:g:t:nd" opt; do
  case $opt in
    c) conf=$OPTARG ;;
    A) app=$OPTARG ;;
    m) manage=$OPTARG ;;
    s) state=$OPTARG ;;
    g) grace=$OPTARG ;;
    t) shutdown_timeout=$OPTARG ;;
    n) start_again= ;;
    d) dry_run=1 ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { say "unexpected argument: $1"; usage; }
[ -n "$conf" ] || die "no supervisord configuration: pass -c FILE or set SUPERVISORD_CONF"
[ -r "$conf" ] || die "cannot read supervisord configuration $conf"
[ -n "$app" ] || [ -n "$manage" ] || die "no Celery app: pass -A APP (or set CELERY_APP) or -m manage.py"
[[ "$grace" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "-g: not a number of seconds: $grace"
[[ "$shutdown_timeout" =~ ^[0-9]+$ ]] || die "-t: not a whole number of seconds: $shutdown_timeout"
command -v supervisorctl >/dev/null || die "supervisorctl is not on PATH"
[ -z "$start_again" ] || command -v supervisord >/dev/null || die "supervisord is not on PATH"

# The Python that runs this project (see the usage above).
can_import() { command -v "$1" >/dev/null 2>&1 && "$1" -c 'import celery_supervise' 2>/dev/null; }
if [ -n "${PYTHON:-}" ]; then
  python=$PYTHON
  can_import "$python" || die "PYTHON=$python cannot import celery_supervise"
else
  python=
  for tool in celery-supervise supervisorctl; do
    where=$(command -v "$tool" || true)
    if [ -n "$where" ] && can_import "$(dirname "$where")/python"; then
      python=$(dirname "$where")/python
      break
    fi
  done
  if [ -z "$python" ]; then
    can_import python3 || die "no Python here can import celery_supervise; set PYTHON to your project's Python"
    python=python3
  fi
fi
if [ -n "$manage" ]; then
  tool=("$python" "$manage" celery)
else
  tool=("$python" -m celery_supervise -A "$app")
fi

if [ -z "$state" ]; then
  tmpdir=$(mktemp -d)  # 0700: nobody else can swap the state file
  trap 'rm -rf "$tmpdir"' EXIT
  state=$tmpdir/celery-supervise.json
fi

ctl() { supervisorctl -c "$conf" "$@"; }

# "STATE STARTTIME" of a process, from /proc/PID/stat (fields 3 and 22; the
# command name before them may contain spaces, so cut after its ")").
proc_stat() {
  local line fields
  read -r line 2>/dev/null <"/proc/$1/stat" || return 1
  read -ra fields <<<"${line##*) }"
  printf '%s %s\n' "${fields[0]}" "${fields[19]}"
}

# True while the process PID that started at START is running. A zombie has
# exited already: only its parent has not collected it yet, which for a
# supervisord that was not daemonized can take as long as the parent likes.
# A PID held by a process with another start time is not supervisord.
still_running() {
  local now
  now=$(proc_stat "$1") || return 1
  [ "${now%% *}" != Z ] && [ "${now#* }" = "$2" ]
}

say "1/4 recording worker trees and active tasks in $state"
"${tool[@]}" savepid "$state" || die "savepid failed; nothing was stopped"

if [ -n "$dry_run" ]; then
  say "dry run: this is what kill would do after the shutdown"
  "${tool[@]}" kill "$state" --dry-run
  exit 0
fi

sup_pid=$(ctl pid 2>/dev/null || true)
if [[ "$sup_pid" =~ ^[0-9]+$ ]] && sup_stat=$(proc_stat "$sup_pid"); then
  sup_start=${sup_stat#* }
  say "2/4 supervisorctl shutdown (supervisord PID $sup_pid)"
  ctl shutdown >/dev/null || die "supervisorctl shutdown failed"
  waited=0
  # Poll, do not sleep blindly: the stop takes as long as the workers do.
  while still_running "$sup_pid" "$sup_start"; do
    if [ "$waited" -ge $((shutdown_timeout * 10)) ]; then
      die "supervisord (PID $sup_pid) still running after ${shutdown_timeout}s; not killing anything"
    fi
    if [ $((waited % 50)) -eq 0 ] && [ "$waited" -gt 0 ]; then
      say "   waiting for supervisord to exit: $((waited / 10))s of ${shutdown_timeout}s"
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
else
  say "2/4 supervisord is not running; nothing to shut down"
fi

say "3/4 killing what the workers left behind (grace ${grace}s)"
rc=0
"${tool[@]}" kill "$state" --grace "$grace" || rc=$?
if [ "$rc" -ne 0 ]; then
  say "error: kill exited with $rc"
fi

if [ -n "$start_again" ]; then
  say "4/4 starting supervisord"
  supervisord -c "$conf" || die "supervisord did not start"
  for ((i = 0; i < 100; i++)); do
    if new_pid=$(ctl pid 2>/dev/null) && [[ "$new_pid" =~ ^[0-9]+$ ]]; then
      say "done: supervisord is running (PID $new_pid)"
      exit "$rc"
    fi
    sleep 0.1
  done
  die "supervisord did not answer within 10s of starting"
fi
exit "$rc"
