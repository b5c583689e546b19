"""The ``peft-sara`` subcommands: one module each, with a ``main(argv) -> int`` that owns its arguments and
``--help`` (registered in :mod:`peft_sara.cli`); ``output.py`` prints tables and JSON for all of them."""
