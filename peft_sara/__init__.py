"""peft-sara: SaRA (progressive sparse low-rank adaptation) as a PEFT method.

Importing this package registers the ``"sara"`` method with PEFT, so that ``get_peft_model``,
``PeftModel.from_pretrained``, ``inject_adapter_in_model`` and diffusers' ``add_adapter`` accept ``SaRAConfig``:
right away when PEFT is already imported, otherwise the moment it is (PEFT imports torch, transformers and accelerate,
seconds that ``peft-sara --help`` and ``--version`` should not pay). The public names below load on first use.

The package's layers and their import rules: README "Architecture" and the import-linter contracts in
``pyproject.toml``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
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
    "push_sara_adapter": "hub",
    "sara_model_card": "cards",
    "InvalidAdapterError": "file_format",
    "allow_non_finite_values": "checkpoint_checks",
}

__all__ = [*_EXPORTS, "PEFT_TYPE", "__version__"]


_registered: list[Any] = []  # the PeftType once registered


def _register() -> Any:
    if not _registered:
        from .registration import register

        _registered.append(register())
    return _registered[0]


def __getattr__(name: str) -> Any:
    if name == "PEFT_TYPE":
        value = _register()
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


class _RegisterWhenPeftIsImported(importlib.abc.MetaPathFinder):
    """Registers SaRA as soon as PEFT is imported and no import of PEFT or of a ``peft_sara`` module is in progress
    (registration imports ``peft_sara`` modules, which import PEFT: done in the middle, it would find them half
    initialized). Finds nothing itself: it wraps the loaders of those modules to count the imports in progress."""

    def __init__(self) -> None:
        self.in_progress = 0

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "peft" and not fullname.startswith(f"{__name__}."):
            return None
        if fullname == "peft":  # PEFT imports bitsandbytes: first import it without its Hub kernel lookup
            from .hub_kernels import import_bitsandbytes_offline

            import_bitsandbytes_offline()
        for finder in sys.meta_path:
            if type(finder).__name__ == type(self).__name__ or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            exec_module = loader.exec_module

            def exec_then_register(module: Any) -> None:
                self.in_progress += 1
                try:
                    exec_module(module)
                finally:
                    self.in_progress -= 1
                if not self.in_progress and "peft" in sys.modules:
                    if self in sys.meta_path:
                        sys.meta_path.remove(self)
                    _register()

            loader.exec_module = exec_then_register
        return spec


# One hook, also across `importlib.reload(peft_sara)` (which defines the class anew).
sys.meta_path[:] = [finder for finder in sys.meta_path if type(finder).__name__ != "_RegisterWhenPeftIsImported"]
if "peft" in sys.modules:
    _register()
else:
    sys.meta_path.insert(0, _RegisterWhenPeftIsImported())
