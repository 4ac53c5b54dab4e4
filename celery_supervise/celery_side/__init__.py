"""The Celery side: what celery-supervise asks of Celery and its broker.

Finding the workers (:mod:`.discovery`), asking them over the broker
(:mod:`.control`), draining them (:mod:`.drain`), the task journal the
workers keep (:mod:`.journal`), deciding and re-sending cut-off tasks
(:mod:`.requeue`, :mod:`.ledger`), the JSON of task arguments
(:mod:`.task_json`) and the guarded filesystem transport
(:mod:`.fs_transport`). Nothing here signals a process.
"""
