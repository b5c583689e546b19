"""The ``PeftType.SARA`` enum member.

PEFT only accepts methods whose upper-cased name is a member of its ``PeftType`` enum, and Python enums cannot be
subclassed once they have members. We therefore add one member, ``PeftType.SARA``, to the existing enum in place.
Idempotent: importing ``peft_sara`` twice, or reloading it, leaves exactly one ``SARA`` member.
"""

from __future__ import annotations

from peft.utils import PeftType

from .names import PEFT_TYPE_NAME


def add_peft_type_member(name: str) -> PeftType:
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


def sara_peft_type() -> PeftType:
    """``PeftType.SARA``, created on first use."""
    return add_peft_type_member(PEFT_TYPE_NAME)
