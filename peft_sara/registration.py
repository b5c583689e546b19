"""Register SaRA as a PEFT method.

PEFT only accepts methods whose upper-cased name is a member of its ``PeftType`` enum, and Python enums cannot be
subclassed once they have members. We therefore add one member, ``PeftType.SARA``, to the existing enum in place and
then use PEFT's public ``register_peft_method``. Everything here is idempotent: importing ``peft_sara`` twice, or
reloading it, leaves exactly one ``SARA`` member and one registration.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

PEFT_TYPE_NAME = "SARA"
PREFIX = "sara_"


def _add_peft_type_member(name: str) -> PeftType:
    """Add ``name`` as a str-valued member of ``PeftType`` (no-op if it already exists)."""
    if name in PeftType.__members__:
        return PeftType[name]
    # An enum member is an instance of the enum class carrying `_name_` and `_value_`. `PeftType` mixes in `str`,
    # so the instance is created with `str.__new__` exactly as the enum machinery does for class-body members.
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    # The three lookup tables the enum consults: by name (`PeftType["SARA"]`, iteration through
    # `_member_names_`) and by value (`PeftType("SARA")`). These attribute names are stable from Python 3.8
    # through 3.13; `_add_member_` (3.13+) does not update `_member_names_`, so we do it by hand everywhere.
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    if name not in PeftType._member_names_:
        PeftType._member_names_.append(name)
    # Class attribute access (`PeftType.SARA`). `type.__setattr__` bypasses EnumType's guard against reassigning
    # members, which is what we want for a member that did not exist before.
    type.__setattr__(PeftType, name, member)
    return member


def register() -> PeftType:
    """Make ``"sara"`` a registered PEFT method. Safe to call any number of times."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from .config import SaRAConfig
    from .model import SaRAModel

    peft_type = _add_peft_type_member(PEFT_TYPE_NAME)
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        # Already registered (second import, or `importlib.reload`): refresh to the current classes so a reload
        # does not leave PEFT holding stale ones.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = SaRAConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = SaRAModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
        return peft_type
    register_peft_method(name="sara", config_cls=SaRAConfig, model_cls=SaRAModel, prefix=PREFIX)
    return peft_type
