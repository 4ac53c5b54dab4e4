"""A task child that writes down every signal it receives, and who sent it.

    python witness.py DIR LIFETIME [--stay]

Every catchable signal is blocked and taken with ``sigtimedwait``, which
tells the sender's PID; each one is appended to ``DIR/signals`` as
``NAME SENDER_PID`` (one ``write()`` per line), before anything else
happens. SIGTERM then ends it, unless ``--stay`` (a child that will not
die of SIGTERM: only SIGKILL, which cannot be caught, ends it). It writes
``DIR/ready`` once the signals are blocked, and exits by itself after
LIFETIME seconds. The chaos soak (``bench/soak.py --chaos``) checks every
line against the audit log.
"""

import os
import signal
import sys
import time

folder, lifetime = sys.argv[1], float(sys.argv[2])
stay = "--stay" in sys.argv[3:]
catchable = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}
signal.pthread_sigmask(signal.SIG_BLOCK, catchable)
with open(os.path.join(folder, "ready.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.rename(os.path.join(folder, "ready.tmp"), os.path.join(folder, "ready"))

deadline = time.monotonic() + lifetime
while (left := deadline - time.monotonic()) > 0:
    info = signal.sigtimedwait(catchable, min(left, 1.0))
    if info is None:
        continue
    fd = os.open(os.path.join(folder, "signals"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{signal.Signals(info.si_signo).name} {info.si_pid}\n".encode())
    finally:
        os.close(fd)
    if info.si_signo == signal.SIGTERM and not stay:
        sys.exit(0)
