"""Register SaRA as a PEFT method (``PeftType.SARA``, config class, tuner class and the ``sara_`` prefix).

``import peft_sara`` calls :func:`register`; so do the command line's subcommands once their arguments are parsed
(``peft-sara --help`` imports no PEFT). Importing this module imports nothing heavy: PEFT and the tuner are imported
by :func:`register`.

Idempotent: a second call, or ``importlib.reload``, refreshes the mappings to the current classes instead of
tripping PEFT's "already registered" error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .constants import METHOD_NAME, PEFT_TYPE_NAME, PREFIX

if TYPE_CHECKING:
    from peft.utils import PeftType

__all__ = ["register", "PEFT_TYPE_NAME", "PREFIX"]


def register() -> PeftType:
    """Make ``"sara"`` a registered PEFT method and return ``PeftType.SARA``. Safe to call any number of times.

    PEFT imports bitsandbytes when it is installed: it is imported first, without its Hub kernel lookup
    (:mod:`peft_sara.hub_kernels`)."""
    from .hub_kernels import import_bitsandbytes_offline

    import_bitsandbytes_offline()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .tuner.config import SaRAConfig
    from .tuner.model import SaRAModel
    from .tuner.peft_type import sara_peft_type

    peft_type = sara_peft_type()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = SaRAConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = SaRAModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
        return peft_type
    register_peft_method(name=METHOD_NAME, config_cls=SaRAConfig, model_cls=SaRAModel, prefix=PREFIX)
    return peft_type
