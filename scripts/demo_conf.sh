#!/usr/bin/env bash
# Print conf/conf.d/celery.conf again: the demo's Celery worker and
# celery-supervise's eventlistener, as `celery-supervise print-config` prints
# them for any project. tests/test_conf.py checks that the committed file is
# exactly what this prints.
#
# Usage: scripts/demo_conf.sh [OUTPUT]      (default: conf/conf.d/celery.conf)
# Needs celery-supervise on PATH (PATH="$PWD/.venv/bin:$PATH").
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$root/conf/conf.d/celery.conf}

# Paths are relative to conf/conf.d/, where supervisord reads the file
# (%(here)s); the commands name `celery` and `celery-supervise` from PATH.
celery-supervise -A demo print-config \
  --program celery-worker \
  --command 'celery -A demo worker -l info -c 2 -n demo@%h' \
  --directory '%(here)s/../../django_app' \
  --state-dir '%(here)s/../../var/celery-supervise' \
  --log-dir '%(here)s/../../var' >"$out"
