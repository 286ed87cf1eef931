"""The command line: ``python -m compression <subcommand>`` (``main``), one module per command group."""
