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
#   -c FILE      supervisord configuration (or $SUPERVISORD_CONF)
#   -A APP       Celery app for `celery-supervise -A APP` (or $CELERY_APP)
#   -m FILE      use `python FILE celery ...` (the Django command) instead
#   -s FILE      state file (default: a fresh private temp dir)
#   -g SECONDS   grace between SIGTERM and SIGKILL for the leftovers (default 10)
#   -t SECONDS   how long supervisord may take to shut down (default 120)
#   -n           do not start supervisord again
#   -d           dry run: savepid and kill --dry-run only; stop nothing
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
    *) say "usage: $prog -c SUPERVISORD_CONF (-A APP | -m MANAGE_PY) [-s STATE] [-g GRACE] [-t TIMEOUT] [-n] [-d]"; exit 2 ;;
  esac
done
[ -n "$conf" ] || die "no supervisord configuration: pass -c FILE or set SUPERVISORD_CONF"
[ -r "$conf" ] || die "cannot read supervisord configuration $conf"
[ -n "$app" ] || [ -n "$manage" ] || die "no Celery app: pass -A APP (or set CELERY_APP) or -m manage.py"
command -v supervisorctl >/dev/null || die "supervisorctl is not on PATH"

# The Python that runs this project: the one beside supervisorctl.
python=${PYTHON:-$(dirname "$(command -v supervisorctl)")/python}
[ -x "$python" ] || python=python3
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

say "1/4 recording worker trees and active tasks in $state"
"${tool[@]}" savepid "$state" || die "savepid failed; nothing was stopped"

if [ -n "$dry_run" ]; then
  say "dry run: this is what kill would do after the shutdown"
  "${tool[@]}" kill "$state" --dry-run
  exit 0
fi

sup_pid=$(ctl pid 2>/dev/null || true)
if [[ "$sup_pid" =~ ^[0-9]+$ ]]; then
  say "2/4 supervisorctl shutdown (supervisord PID $sup_pid)"
  ctl shutdown >/dev/null || die "supervisorctl shutdown failed"
  waited=0
  # Poll, do not sleep blindly: the stop takes as long as the workers do.
  while kill -0 "$sup_pid" 2>/dev/null; do
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
  for _ in $(seq 1 100); do
    if ctl pid >/dev/null 2>&1; then
      say "done: supervisord is running (PID $(ctl pid))"
      exit "$rc"
    fi
    sleep 0.1
  done
  die "supervisord did not answer within 10s of starting"
fi
exit "$rc"
