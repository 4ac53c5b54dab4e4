#!/usr/bin/env bash
# Restart supervisord's Celery workers for a deploy, leaving no orphans: runs
# `celery-supervise deploy` (savepid -> supervisorctl shutdown -> wait -> kill
# -> supervisord; see docs/deploy.md), for deploys that call a shell script.
#
# Usage: scripts/deploy.sh -c SUPERVISORD_CONF (-A APP | -m MANAGE_PY) [options]
#   -c FILE      supervisord configuration (or $SUPERVISORD_CONF); supervisord
#                is started again with `supervisord -c FILE`
#   -A APP       Celery app: `celery-supervise -A APP deploy` (or $CELERY_APP)
#   -m FILE      `python FILE celery deploy` (the Django command) instead
#   -s FILE      state file (default: a private temp file, kept when needed)
#   -g SECONDS   grace between SIGTERM and SIGKILL for the leftovers (default 10)
#   -t SECONDS   how long supervisord may take to shut down (default 120)
#   -n           do not start supervisord again
#   -d           dry run: savepid and kill --dry-run only; stop nothing
# Run it from your project directory, as you would run `celery -A`. The
# Python is $PYTHON, else the first of: the one beside celery-supervise, the
# one beside supervisorctl, python3, that can import celery_supervise.
# Exit status: that of `celery-supervise deploy`: 0 done, 1 nothing changed,
# 2 usage, 3 stopped but not all went well.
set -euo pipefail

prog=$(basename "$0")
conf=${SUPERVISORD_CONF:-} app=${CELERY_APP:-} manage=
args=()
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
    s) args+=(--state "$OPTARG") ;;
    g) [[ "$OPTARG" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "-g: not a number of seconds: $OPTARG"
       args+=(--grace "$OPTARG") ;;
    t) [[ "$OPTARG" =~ ^[0-9]+$ ]] || die "-t: not a whole number of seconds: $OPTARG"
       args+=(--shutdown-timeout "$OPTARG") ;;
    n) args+=(--no-start) ;;
    d) args+=(--dry-run) ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { say "unexpected argument: $1"; usage; }
[ -n "$conf" ] || die "no supervisord configuration: pass -c FILE or set SUPERVISORD_CONF"
[ -r "$conf" ] || die "cannot read supervisord configuration $conf"
[ -n "$app" ] || [ -n "$manage" ] || die "no Celery app: pass -A APP (or set CELERY_APP) or -m manage.py"

# The Python that runs this project (see the usage above).
can_import() { command -v "$1" >/dev/null 2>&1 && "$1" -c 'import celery_supervise' 2>/dev/null; }
python=${PYTHON:-}
if [ -n "$python" ]; then
  can_import "$python" || die "PYTHON=$python cannot import celery_supervise"
else
  for tool in celery-supervise supervisorctl; do
    where=$(command -v "$tool" || true)
    if [ -n "$where" ] && can_import "$(dirname "$where")/python"; then python=$(dirname "$where")/python; break; fi
  done
  [ -n "$python" ] || { can_import python3 && python=python3; } \
    || die "no Python here can import celery_supervise; set PYTHON to your project's Python"
fi

# Its progress lines then start with this script's name, as they always did.
export CELERY_SUPERVISE_LOG_NAME=$prog
if [ -n "$manage" ]; then
  exec "$python" "$manage" celery deploy -c "$conf" "${args[@]}"
fi
exec "$python" -m celery_supervise -A "$app" deploy -c "$conf" "${args[@]}"
