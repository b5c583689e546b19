"""Register SaRA as a PEFT method (``PeftType.SARA``, config class, tuner class and the ``sara_`` prefix).

Idempotent: a second import, or ``importlib.reload``, refreshes the mappings to the current classes instead of
tripping PEFT's "already registered" error.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from .tuner.config import SaRAConfig
from .tuner.model import SaRAModel
from .tuner.peft_type import METHOD_NAME, PEFT_TYPE_NAME, PREFIX, sara_peft_type

__all__ = ["register", "PEFT_TYPE_NAME", "PREFIX"]


def register() -> PeftType:
    """Make ``"sara"`` a registered PEFT method. Safe to call any number of times."""
    peft_type = sara_peft_type()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = SaRAConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = SaRAModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
        return peft_type
    register_peft_method(name=METHOD_NAME, config_cls=SaRAConfig, model_cls=SaRAModel, prefix=PREFIX)
    return peft_type
