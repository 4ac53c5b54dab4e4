"""One module per verb (COMMON decision 1): ``deploy``, ``print_config``, ...

Each verb's entry point returns a result that knows its own ``exit_code``
and its JSON document (``to_document()``); the CLI and the Django command
parse their input, call the verb and render the result. Nothing is imported
here, so that loading one verb does not load the others' dependencies.
"""
