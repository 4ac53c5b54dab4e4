"""Run one celery-supervise action the moment the test says go.

    python primed.py cli ARG...            exit with ``celery-supervise ARG...``'s code
    python primed.py sweep STATE_DIR PID   one listener sweep of STATE_DIR, as a
                                           listener whose supervisord is PID

Everything is imported first, then ``ready`` is printed and one line is read
from stdin. The clock-jump tests set the clock only after ``ready``, so the
time it is wrong covers the action and not Python's start-up (other test
runs share this machine's clock). Nothing reads the boot time before go.
"""

import sys

from celery_supervise import cli, listener  # noqa: F401  (imported before go, on purpose)
from celery_supervise.processes import procs

mode, args = sys.argv[1], sys.argv[2:]
print("ready", flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(97)
if mode == "cli":
    sys.exit(cli.run(args))
if mode == "sweep":
    state_dir, sup_pid = args
    run = listener.Listener(state_dir=state_dir, grace=2, supervisor=procs.Identity.of(int(sup_pid)),
                            stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)
    run.sweep("test")
    sys.exit(0)
sys.exit(98)
