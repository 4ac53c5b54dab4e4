"""The process layer: read, decide, signal. No Celery, kombu or supervisor here.

snapshot -> plan -> act: :mod:`.procs` reads ``/proc`` and psutil into
frozen :class:`~.procs.Proc` records (process identity is PID plus creation
time, :class:`~.procs.Identity`); :mod:`.snapshot` groups them into worker
trees and re-visits a recorded tree; :mod:`.plan` is the pure kill
decision; :mod:`.kill` re-verifies identity and signals bottom-up.
:mod:`.statefile` and :mod:`.lock` keep the record between savepid and
kill. Everything here works on plain data, so it can be read, tested and
benchmarked without a broker or a supervisord.
"""
