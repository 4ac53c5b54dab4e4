"""A process that ignores SIGTERM, and says so.

    python stubborn.py LOG LIFETIME

Writes ``ready`` to LOG once its handler is installed, then a ``TERM`` line
for every SIGTERM it receives (and survives). Only SIGKILL, or LIFETIME
seconds, ends it.
"""

import os
import signal
import sys
import time

log, lifetime = sys.argv[1], float(sys.argv[2])
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
signal.signal(signal.SIGTERM, lambda *_: os.write(fd, b"TERM\n"))
os.write(fd, b"ready\n")
deadline = time.monotonic() + lifetime
while time.monotonic() < deadline:
    time.sleep(0.1)
