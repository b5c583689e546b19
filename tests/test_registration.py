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


def run_fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_importing_peft_sara_first_registers_when_peft_is_imported_and_stays_light():
    """`import peft_sara` before PEFT: nothing heavy is imported until PEFT is, and PEFT's own loaders then know SaRA
    (the post-import hook registers it before `import peft` returns)."""
    code = """
import sys, tempfile, torch
import peft_sara
assert not {"torch", "peft", "diffusers", "transformers"} & set(sys.modules) - {"torch"}, sorted(sys.modules)
from peft import PeftModel, PeftType, get_peft_model
assert PeftType.SARA.value == "SARA"
model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), peft_sara.SaRAConfig(target_modules=["0"], trainable_fraction=0.5, init_weights=False))
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(model.get_base_model().__class__(torch.nn.Linear(8, 8)), folder)
print("ok", type(loaded.base_model).__name__)
"""
    completed = run_fresh(code)
    assert completed.returncode == 0 and "ok SaRAModel" in completed.stdout, completed.stderr[-3000:]


def test_import_is_light_and_public_names_load_on_first_use():
    completed = run_fresh(
        "import sys, peft_sara; light = 'torch' not in sys.modules; "
        "from peft_sara import SaRAConfig, load_sara_adapter, PEFT_TYPE; print(light, PEFT_TYPE.value)"
    )
    last_line = completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else ""
    assert completed.returncode == 0 and last_line.split() == ["True", "SARA"], completed.stderr[-3000:]


def test_cli_help_and_version_do_not_import_torch():
    code = "import sys; from peft_sara.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    completed = run_fresh(code)
    assert completed.returncode == 0 and completed.stdout.strip().endswith("False"), completed.stderr[-3000:]
