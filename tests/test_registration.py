"""Registering SaRA inside PEFT: enum member, mappings, idempotence."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
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


def run_fresh(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_peft_sara_registers_with_peft_at_once_without_an_import_hook():
    """`import peft_sara` alone, then PEFT's own entry points: `get_peft_model` with a SaRAConfig and
    `PeftModel.from_pretrained` on a SaRA folder, in a fresh interpreter; no finder of ours on `sys.meta_path`."""
    code = """
import sys, tempfile
import peft_sara
assert not [f for f in sys.meta_path if type(f).__module__.startswith("peft_sara")], sys.meta_path
import torch
from peft import PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SARA] is peft_sara.SaRAConfig
model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), peft_sara.SaRAConfig(target_modules=["0"], trainable_fraction=0.5, init_weights=False))
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(torch.nn.Sequential(torch.nn.Linear(8, 8)), folder)
print("ok", type(loaded.base_model).__name__)
"""
    completed = run_fresh(code)
    assert completed.returncode == 0 and "ok SaRAModel" in completed.stdout, completed.stderr[-3000:]


def test_from_pretrained_right_after_import_peft_sara(tmp_path):
    """The README's order: `import peft_sara`, then PEFT's loader, with no peft_sara name touched in between."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(0)
    config = peft_sara.SaRAConfig(target_modules=["0"], trainable_fraction=0.5, init_weights=False)
    get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), config).save_pretrained(tmp_path)
    code = (
        "import peft_sara, torch\nfrom peft import PeftModel\n"
        f"model = PeftModel.from_pretrained(torch.nn.Sequential(torch.nn.Linear(8, 8)), {str(tmp_path)!r})\n"
        "print('loaded', type(model.base_model).__name__)"
    )
    completed = run_fresh(code)
    assert completed.returncode == 0 and "loaded SaRAModel" in completed.stdout, completed.stderr[-3000:]


def test_public_names_and_peft_type_after_import():
    completed = run_fresh(
        "import sys, peft_sara; registered = 'peft' in sys.modules; "
        "from peft_sara import SaRAConfig, load_sara_adapter, PEFT_TYPE; print(registered, PEFT_TYPE.value)"
    )
    last_line = completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else ""
    assert completed.returncode == 0 and last_line.split() == ["True", "SARA"], completed.stderr[-3000:]


@pytest.mark.parametrize(
    ("argv", "orig_argv", "expected"),
    [
        (["-m"], ["python", "-m", "peft_sara", "--help"], True),
        (["-m"], ["python", "-X", "importtime", "-m", "peft_sara.demo"], True),
        (["-m"], ["python", "-m", "my_training.run"], False),  # a user's package that imports peft_sara
        (["-m"], ["python", "-m", "peft_sara_other"], False),
        (["/venv/bin/peft-sara", "inspect", "x"], [], True),
        (["C:\\venv\\Scripts\\peft-sara-demo.exe"], [], True),
        (["train.py", "peft-sara"], [], False),
        (["-c"], ["python", "-c", "import peft_sara"], False),
        ([], [], False),
    ],
)
def test_only_the_packages_own_command_line_starts_without_registering(monkeypatch, argv, orig_argv, expected):
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert peft_sara._command_line_start() is expected


def imported_modules(*argv: str) -> set[str]:
    """The modules a fresh `python -m peft_sara ARGV` imports (from `-X importtime`)."""
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "peft_sara", *argv], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {
        line.rsplit("|", 1)[-1].strip() for line in completed.stderr.splitlines() if line.startswith("import time:")
    }


def test_cli_help_and_version_import_no_torch_or_peft():
    subcommands = ("inspect", "analyze", "export", "merge", "push", "plan", "demo")
    for argv in (["--help"], ["--version"], *([name, "--help"] for name in subcommands)):
        modules = imported_modules(*argv)
        assert "peft_sara.cli" in modules, argv
        assert not {"torch", "peft", "diffusers", "transformers", "numpy"} & modules, argv
