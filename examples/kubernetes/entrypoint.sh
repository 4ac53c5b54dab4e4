#!/bin/sh
# The container's entry point: supervisord becomes PID 1.
#
# exec, so that supervisord, not a shell, is PID 1: the kernel delivers no
# signal to PID 1 that it has no handler for, so a shell waiting on
# supervisord would swallow the kubelet's SIGTERM until the SIGKILL.
# supervisord handles SIGTERM (it stops every program, the listener last)
# and reaps every orphan re-parented to it, as PID 1 must.
set -eu

# supervisord's socket and pidfile, and the listener's records (it creates
# its folder 0700 itself): in the container's own file system, never on a
# volume another container writes too (see docs/containers.md).
mkdir -p "$RUN_DIR"
chmod 0700 "$RUN_DIR"
exec supervisord -n -c "${SUPERVISORD_CONF:-/etc/supervisor/supervisord.conf}"
