"""``python manage.py celery savepid|kill|status|drain|restart``: the Django shell over the core.

Same options and output as the ``celery-supervise`` CLI. The Celery app is
``settings.CELERY_SUPERVISE_APP`` ("module:attribute"); without it, the
package of ``DJANGO_SETTINGS_MODULE`` (``proj.settings`` -> ``proj``), which
Celery resolves to ``proj.celery:app`` just as ``celery -A proj`` does.
Errors become ``CommandError`` with the CLI's exit code.
"""

from __future__ import annotations

import os

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from celery_supervise import operations, report, restart as restarting, rpc
from celery_supervise.control import load_app
from celery_supervise.errors import EXIT_PARTIAL, SuperviseError
from celery_supervise.plan import Policy


def default_app_spec() -> str | None:
    spec = getattr(settings, "CELERY_SUPERVISE_APP", None)
    if spec:
        return spec
    module = os.environ.get("DJANGO_SETTINGS_MODULE", "")
    return module.rsplit(".", 1)[0] if "." in module else None


class Command(BaseCommand):
    help = ("Record, show and kill this host's Celery worker trees, drain the workers, restart their "
            "supervisord programs, or requeue the tasks a stop cut off (celery-supervise).")

    #: What an exit code 3 means, per action, for the CommandError line.
    PARTIAL = {
        "savepid": "the broker failed: the record has the process trees but not the active tasks (see above)",
        "kill": "some processes could not be killed (see the table)",
        "drain": "the drain timed out with tasks still running (see the table)",
        "requeue": "the broker failed before every task was re-sent (see the table); run requeue again",
    }

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", metavar="{savepid,kill,status,drain,restart,requeue}",
                                    required=True)

        def common(p, *, supervisor=False, timeout=False):
            p.add_argument("--spare", metavar="RULES", default=None,
                           help="Comma list of setsid, nohup, pgroup, or none (default: setsid,nohup).")
            p.add_argument("--json", dest="as_json", action="store_true", help="Print one JSON document.")
            if supervisor:
                p.add_argument("--supervisor-url", default=os.environ.get("SUPERVISOR_SERVER_URL"),
                               help="supervisord's XML-RPC URL.")
                p.add_argument("--program", action="append", default=[], metavar="GLOB",
                               help="supervisord program(s) running the workers (repeatable).")
            if timeout:
                p.add_argument("--timeout", type=float, default=operations.DEFAULT_TIMEOUT,
                               help="Seconds to wait for each broker reply.")

        p = sub.add_parser("savepid", help="Record worker trees and active tasks (before the stop).")
        p.add_argument("file")
        common(p, supervisor=True, timeout=True)

        p = sub.add_parser("kill", help="Kill the recorded trees, sparing detached descendants (after the stop).")
        p.add_argument("file")
        p.add_argument("--grace", type=float, default=operations.DEFAULT_GRACE,
                       help="Seconds between SIGTERM and SIGKILL.")
        p.add_argument("--dry-run", action="store_true", help="Show what would be signalled; signal nothing.")
        common(p)

        p = sub.add_parser("status", help="Draw the live worker trees with verdicts; change nothing.")
        common(p, supervisor=True, timeout=True)

        p = sub.add_parser("drain", help="Stop workers taking new tasks and wait until their running ones finish.")
        p.add_argument("--destination", "-d", action="append", default=[], metavar="NODE",
                       help="Drain this worker node, e.g. demo@host (repeatable; default: this host's workers).")
        p.add_argument("--all", dest="all_workers", action="store_true",
                       help="Drain every worker that answers on the app's broker.")
        p.add_argument("--timeout", type=float, default=operations.DEFAULT_DRAIN_TIMEOUT,
                       help="Seconds to wait, in all, for the workers to finish their tasks.")
        p.add_argument("--json", dest="as_json", action="store_true", help="Print one JSON document.")

        p = sub.add_parser("requeue", help="Re-send the recorded tasks the stop cut off, once (after the stop).")
        p.add_argument("file")
        p.add_argument("--journal", metavar="DIR", default=None,
                       help="The workers' task journal (default: the one the app installs, or CELERY_SUPERVISE_JOURNAL).")
        p.add_argument("--dry-run", action="store_true", help="Show what would be re-sent; send nothing.")
        p.add_argument("--json", dest="as_json", action="store_true", help="Print one JSON document.")

        p = sub.add_parser("restart", help="Restart supervisord programs running Celery workers: savepid, drain, "
                           "stop, kill, start, wait for a ping.")
        p.add_argument("programs", nargs="+", metavar="PROGRAM", help="NAME, GROUP:NAME or GROUP:*.")
        p.add_argument("--drain-timeout", type=float, default=operations.DEFAULT_DRAIN_TIMEOUT,
                       help="Seconds the old workers may take to finish their tasks.")
        p.add_argument("--grace", type=float, default=operations.DEFAULT_GRACE,
                       help="Seconds between SIGTERM and SIGKILL for leftovers.")
        p.add_argument("--start-timeout", type=float, default=restarting.DEFAULT_START_TIMEOUT,
                       help="Seconds the new workers may take to answer a ping.")
        p.add_argument("--supervisor-url", default=os.environ.get("SUPERVISOR_SERVER_URL"),
                       help="supervisord's XML-RPC URL.")
        p.add_argument("-c", "--configuration", metavar="SUPERVISORD_CONF", default=None,
                       help="Read supervisord's URL and credentials from this file, as supervisorctl -c does.")
        p.add_argument("--state", metavar="FILE", default=None, help="Keep the savepid record here.")
        p.add_argument("--timeout", type=float, default=operations.DEFAULT_TIMEOUT,
                       help="Seconds to wait for each broker reply.")
        p.add_argument("--json", dest="as_json", action="store_true", help="Print one JSON document.")

    def handle(self, *args, action, **options):
        # rich writes whole chunks; Django's OutputWrapper would append a
        # newline to each, so rich gets the underlying streams.
        out, err = report.consoles(self.stdout._out, self.stderr._out)
        try:
            code = getattr(self, f"do_{action}")(out, err, **options)
        except SuperviseError as exc:
            raise CommandError(str(exc), returncode=exc.exit_code) from None
        except (CommandError, KeyboardInterrupt):
            raise
        except Exception as exc:  # one line, as the CLI does; --traceback shows it all
            if options.get("traceback"):
                raise
            raise CommandError(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}") from None
        if code == EXIT_PARTIAL:
            raise CommandError(self.PARTIAL[action], returncode=code)

    def _app_spec(self) -> str:
        spec = default_app_spec()
        if spec is None:
            raise CommandError("set CELERY_SUPERVISE_APP = 'module:attribute' in your settings")
        return spec

    def _targets(self, supervisor_url, programs, timeout) -> operations.Targets:
        spec = self._app_spec()
        return operations.Targets(app=load_app(spec), app_spec=spec, supervisor_url=supervisor_url,
                                  programs=tuple(programs), timeout=timeout)

    def do_savepid(self, out, err, *, file, spare, as_json, supervisor_url, program, timeout, **_):
        policy = Policy.parse(spare)  # before any slow discovery, so a typo fails at once
        result = operations.savepid(file, self._targets(supervisor_url, program, timeout), policy)
        return report.render_save(out, err, result, as_json)

    def do_kill(self, out, err, *, file, grace, dry_run, spare, as_json, **_):
        if grace < 0:
            raise CommandError("--grace must not be negative", returncode=2)
        policy = Policy.parse(spare) if spare is not None else None
        progress = report.WaitProgress(err)
        try:
            result = operations.kill(file, policy=policy, grace=grace, dry_run=dry_run,
                                     app_spec=default_app_spec(), on_wait=progress)
        finally:
            progress.close()
        return report.render_kill(out, err, result, as_json)

    def do_status(self, out, err, *, spare, as_json, supervisor_url, program, timeout, **_):
        policy = Policy.parse(spare)
        result = operations.status(self._targets(supervisor_url, program, timeout), policy)
        return report.render_status(out, err, result, as_json)

    def do_drain(self, out, err, *, destination, all_workers, timeout, as_json, **_):
        spec = self._app_spec()
        progress = report.DrainProgress(err)
        try:
            result = operations.drain(load_app(spec), spec, destinations=destination, all_workers=all_workers,
                                      timeout=timeout, on_progress=progress)
        finally:
            progress.close()
        return report.render_drain(out, err, result, as_json)

    def do_requeue(self, out, err, *, file, journal, dry_run, as_json, **_):
        result = operations.requeue(file, load_app(self._app_spec()), journal_dir=journal, dry_run=dry_run)
        return report.render_requeue(out, err, result, as_json)

    def do_restart(self, out, err, *, programs, drain_timeout, grace, start_timeout, supervisor_url, configuration,
                   state, timeout, as_json, **_):
        spec = self._app_spec()
        server = rpc.find_server(supervisor_url, configuration)
        drain_progress, wait_progress = report.DrainProgress(err), report.WaitProgress(err)
        try:
            result = operations.restart(
                load_app(spec), spec, programs, server, state_path=state, drain_timeout=drain_timeout, grace=grace,
                start_timeout=start_timeout, timeout=timeout, on_drain=drain_progress, on_wait=wait_progress,
            )
        finally:
            drain_progress.close()
            wait_progress.close()
        code = report.render_restart(out, err, result, as_json)
        if code == EXIT_PARTIAL:
            raise CommandError(result.problem, returncode=code)
        return code
