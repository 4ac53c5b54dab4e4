"""A process that writes down every signal it receives, for "never a signal" tests.

Usage: ``signal_witness.py DIR LIFETIME [--stay]``. Every catchable signal gets a
handler that appends its name to ``DIR/signals`` (and only SIGTERM's then
exits, unless ``--stay``: then only SIGKILL ends it), so a SIGTERM, SIGHUP, SIGINT… sent by the code under test is on
record even if the test only looks afterwards; SIGKILL and SIGSTOP cannot be caught, and
show as a dead or stopped witness instead. Once the handlers are in place
it writes its PID to ``DIR/ready`` (write, then rename), and it exits by
itself after LIFETIME seconds.
"""

import os
import signal
import sys
import time

folder, lifetime = sys.argv[1], float(sys.argv[2])
stay = "--stay" in sys.argv[3:]
log = os.path.join(folder, "signals")


def record(signum, frame):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{signal.Signals(signum).name}\n".encode())
    finally:
        os.close(fd)
    if signum == signal.SIGTERM and not stay:
        os._exit(0)  # on record; exiting spares the tests' reaper its SIGKILL wait


for sig in signal.valid_signals():
    if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
        continue
    try:
        signal.signal(sig, record)
    except (OSError, ValueError):
        continue  # a signal the runtime reserves

with open(os.path.join(folder, "ready.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.rename(os.path.join(folder, "ready.tmp"), os.path.join(folder, "ready"))

deadline = time.monotonic() + lifetime
while (left := deadline - time.monotonic()) > 0:
    time.sleep(min(left, 1.0))  # a handled signal ends a sleep early; loop on
