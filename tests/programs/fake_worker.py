"""A stand-in for a prefork Celery worker, without Celery, for fast real-process tests.

    python fake_worker.py OUT_DIR LIFETIME

The main forks two "pool" processes (same command line, as billiard's
prefork pool does). Each pool starts, as a task would:

* ``plain``: an attached ``sleep``;
* ``parent``/``grandchild``: an attached ``sh`` with a ``sleep`` below it;
* ``nohup``: ``nohup sleep`` (ignores SIGHUP);
* ``setsid``: ``sleep`` in a new session.

Each pool writes ``OUT_DIR/pool-<pid>.json`` atomically once its children
exist; the main writes ``OUT_DIR/main.json`` once both pools have. Every
process exits on its own after LIFETIME seconds at most.
"""

import json
import os
import subprocess
import sys
import time

out, lifetime = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + float(lifetime)


def publish(name, data):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.rename(tmp, os.path.join(out, name))


def pool():
    quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plain = subprocess.Popen(["sleep", lifetime], **quiet)
    gc_file = os.path.join(out, f"gc-{os.getpid()}")
    parent = subprocess.Popen(["sh", "-c", f'sleep {lifetime} & echo $! > {gc_file}.tmp && mv {gc_file}.tmp {gc_file}; wait'], **quiet)
    nohup = subprocess.Popen(["nohup", "sleep", lifetime], **quiet)
    setsid = subprocess.Popen(["sleep", lifetime], start_new_session=True, **quiet)
    while not os.path.exists(gc_file):
        if time.monotonic() > deadline:
            os._exit(1)
        time.sleep(0.01)
    with open(gc_file) as f:
        grandchild = int(f.read())
    # nohup execs sleep with SIGHUP ignored; wait until it has.
    while b"nohup" in open(f"/proc/{nohup.pid}/cmdline", "rb").read().split(b"\0")[0]:
        time.sleep(0.01)
    publish(f"pool-{os.getpid()}.json", {"pool": os.getpid(), "plain": plain.pid, "parent": parent.pid,
                                         "grandchild": grandchild, "nohup": nohup.pid, "setsid": setsid.pid})
    while time.monotonic() < deadline:
        time.sleep(0.2)
    os._exit(0)


pools = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        pool()
    pools.append(pid)
while not all(os.path.exists(os.path.join(out, f"pool-{p}.json")) for p in pools):
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.01)
publish("main.json", {"main": os.getpid(), "pools": pools})
while time.monotonic() < deadline:
    time.sleep(0.2)
