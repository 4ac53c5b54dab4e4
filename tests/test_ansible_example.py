"""examples/ansible/rolling-restart.yml: one host at a time, stop at the first failure, the CLI's real options.

The playbook is parsed, not run (no Ansible here); its command line is
checked against the CLI's own option table, so a renamed option breaks
this test rather than a user's deploy.
"""

from pathlib import Path

import yaml

from celery_supervise import cli

PLAYBOOK = Path(__file__).resolve().parent.parent / "examples" / "ansible" / "rolling-restart.yml"


def test_the_playbook_rolls_one_host_at_a_time_and_stops_at_a_failure():
    [play] = yaml.safe_load(PLAYBOOK.read_text())
    assert play["serial"] == 1 and play["max_fail_percentage"] == 0
    roll = play["tasks"][0]
    assert roll["failed_when"] == "roll.rc != 0"
    argv = roll["ansible.builtin.command"]["argv"]
    assert argv[1:5] == ["-A", "{{ app }}", "restart", "{{ program }}"]
    assert "--rolling" in argv and "drain" not in argv


def test_every_option_of_the_playbook_is_one_restart_has():
    [play] = yaml.safe_load(PLAYBOOK.read_text())
    argv = play["tasks"][0]["ansible.builtin.command"]["argv"]
    restart = cli.command_tree().commands["restart"]
    known = {opt for p in restart.params for opt in p.opts}
    used = [a for a in argv[4:] if a.startswith("-")]
    assert used and set(used) <= known, set(used) - known
