"""``python -m peft_sara``: the ``peft-sara`` command line."""

from .cli import main

raise SystemExit(main())
