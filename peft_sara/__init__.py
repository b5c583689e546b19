"""peft-sara: SaRA (progressive sparse low-rank adaptation) as a PEFT method.

Importing this package registers the ``"sara"`` method with PEFT (:func:`peft_sara.registration.register`), so that
``get_peft_model``, ``PeftModel.from_pretrained``, ``inject_adapter_in_model`` and diffusers' ``add_adapter`` accept
``SaRAConfig`` and SaRA adapter folders. That imports PEFT (with torch, transformers and accelerate). The public
names below load on first use.

One exception: the package's own command line (``peft-sara``, ``peft-sara-demo`` and ``python -m peft_sara...``)
starts without PEFT, so that ``--help`` answers at once; its subcommands register SaRA once their arguments are
parsed.

The package's layers and their import rules: README "Architecture" and the import-linter contracts in
``pyproject.toml``.
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import Any

from .constants import __version__

# Public name -> the module that defines it (imported on first access).
_EXPORTS = {
    "SaRAConfig": "tuner.config",
    "SaRAModel": "tuner.model",
    "SaRALayer": "tuner.layer",
    "SparseUpdate": "tuner.layer",
    "Linear": "tuner.layer",
    "Conv": "tuner.layer",
    "sara_layers": "tuner.layer",
    "load_sara_adapter": "pipelines",
    "save_sara_adapter": "pipelines",
    "enable_sara_hotswap": "hotswap",
    "hotswap_adapter": "hotswap",
    "hotswap_sizing": "hotswap",
    "hotswap_slot": "hotswap",
    "push_sara_adapter": "hub",
    "sara_model_card": "cards",
    "InvalidAdapterError": "file_format",
    "allow_non_finite_values": "checkpoint_checks",
}

__all__ = [*_EXPORTS, "PEFT_TYPE", "__version__"]

# The console scripts' names, as installers write them (`peft-sara`, Windows' `peft-sara.exe` / `-script.py`).
_CONSOLE_SCRIPT = re.compile(r"peft-sara(-demo)?(\.exe|-script\.pyw?)?")


def _command_line_start() -> bool:
    """True while Python starts this package's command line: ``python -m peft_sara[.module]`` (while Python imports
    the packages above the module it runs, ``sys.argv[0]`` is ``"-m"`` and ``sys.orig_argv`` names the module) or a
    ``peft-sara`` / ``peft-sara-demo`` console script (``sys.argv[0]`` is the script)."""
    argv = sys.argv or [""]
    if argv[0] == "-m":
        original = list(getattr(sys, "orig_argv", []))
        module = next((original[i + 1] for i, arg in enumerate(original[:-1]) if arg == "-m"), "")
        return module == __name__ or module.startswith(f"{__name__}.")
    return bool(_CONSOLE_SCRIPT.fullmatch(argv[0].replace("\\", "/").rsplit("/", 1)[-1]))


def __getattr__(name: str) -> Any:
    if name == "PEFT_TYPE":
        from .registration import register

        value = register()
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


if not _command_line_start():
    from .registration import register as _register

    PEFT_TYPE = _register()
