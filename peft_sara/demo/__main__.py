"""``python -m peft_sara.demo``."""

from . import main

raise SystemExit(main())
