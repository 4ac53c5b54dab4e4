"""``celery-supervise drain``: stop workers taking tasks and wait until they hold none.

The drain itself (cancel the queues, poll until idle) is
:class:`celery_supervise.celery_side.drain.Drainer`; this picks the targets.
"""

from __future__ import annotations

from typing import Callable, Iterable

from .. import options
from ..celery_side import control, discovery, drain as draining
from ..errors import UsageError

DEFAULT_DRAIN_TIMEOUT = options.DRAIN_TIMEOUT  # seconds a drain may take in all


def drain(
    app,
    app_spec: str | None,
    *,
    destinations: Iterable[str] = (),
    all_workers: bool = False,
    timeout: float = DEFAULT_DRAIN_TIMEOUT,
    on_progress: Callable[[draining.Assessment, float, float], None] | None = None,
    remote_factory: Callable[[object], draining.Remote] = control.Remote,
) -> draining.DrainResult:
    """Stop workers taking tasks and wait until they hold none.

    Targets are this host's workers of *app_spec* (found by a process scan,
    as savepid finds them, with no round trip), the nodes named in
    *destinations*, or with *all_workers* every worker that answers on the
    app's broker.
    """
    from celery.utils.nodenames import host_format

    if app is None or not app_spec:
        raise UsageError("drain needs -A APP: the app whose broker and queues the workers use")
    destinations = [host_format(d) for d in destinations]
    if destinations and all_workers:
        raise UsageError("--destination and --all exclude each other")
    if not timeout > 0:
        raise UsageError("--drain-timeout must be positive")
    configured = draining.configured_queues(app.conf.task_default_queue, app.conf.task_queues)
    targets: list[draining.Target] | None = None  # None: every worker that answers
    if not all_workers:
        local = draining.local_targets(discovery.scan(app_spec, discovery.app_root(app_spec)), configured)
        targets = draining.named_targets(destinations, local) if destinations else local
        if not targets:
            return draining.DrainResult(
                targets=(), cancelled=(), drained=True, elapsed=0.0, timeout=timeout,
                warnings=[f"no Celery worker of {app_spec} is running on this host; nothing to drain "
                          "(name workers elsewhere with --destination, or use --all)"],
            )
    with remote_factory(app) as remote:
        return draining.Drainer(remote, on_progress=on_progress).run(targets, configured, timeout)
