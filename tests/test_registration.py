"""Registering SaRA inside PEFT: enum member, mappings, idempotence."""

from __future__ import annotations

import importlib
import subprocess
import sys

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_sara
from peft_sara.registration import register


def test_sara_is_a_real_peft_type_member():
    assert PeftType.SARA is PeftType("SARA") is PeftType["SARA"]
    assert PeftType.SARA.value == "SARA" and PeftType.SARA == "SARA"
    assert list(PeftType).count(PeftType.SARA) == 1
    assert isinstance(PeftType.SARA, PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SARA] is peft_sara.SaRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SARA] is peft_sara.SaRAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SARA] == "sara_"


def test_registration_is_idempotent_and_survives_reload():
    register()
    register()
    members_before = list(PeftType)
    importlib.reload(peft_sara.registration)
    peft_sara.registration.register()
    assert list(PeftType) == members_before
    assert list(PeftType).count(PeftType.SARA) == 1


def test_import_in_a_fresh_interpreter_twice():
    code = (
        "import importlib, peft_sara; importlib.reload(peft_sara); from peft.utils import PeftType; "
        "assert [m.name for m in PeftType].count('SARA') == 1; print(sys.version_info[:2]) if False else None"
    )
    result = subprocess.run([sys.executable, "-c", "import sys; " + code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_other_peft_types_are_unaffected():
    assert PeftType.LORA.value == "LORA"
    assert PeftType("SHIRA") is PeftType.SHIRA
