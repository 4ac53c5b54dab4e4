"""One module per verb: ``savepid`` (and ``status``), ``kill``, ``drain``, ``requeue``,
``restart``, ``deploy`` (its steps in ``deploy_steps``), ``print_config``.

Each verb's entry point takes plain arguments and returns a result that
knows its own ``exit_code`` and its JSON document (``to_document()``); the
CLI, the Django command and the listener parse their input, call the verb
and render the result. Nothing is imported here, so that loading one verb
does not load the others' dependencies.
"""
