"""What the command line imports: ``peft-sara inspect`` reads an adapter's files without PEFT, diffusers or
transformers, and reports what a full load of the config would (speed itself: ``benchmarks/cli_startup.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing

import pytest
import torch
from peft import get_peft_model

import peft_sara
from peft_sara import cli
from peft_sara.adapter_files import read_reported_config_fields, read_sara_config
from peft_sara.tuner.config import SaRAConfig
from peft_sara.tuner.config_checks import REPORTED_FIELDS
from peft_sara.tuner.file_format import InvalidAdapterError

pytestmark = pytest.mark.usefixtures("one_thread")


def save_tiny_adapter(folder, **config):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    settings = {"target_modules": ["0", "2"], "init_weights": False, **config}
    get_peft_model(model, peft_sara.SaRAConfig(**settings)).save_pretrained(folder)
    return folder


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, **changes}))


def test_the_reported_fields_are_annotated_as_the_config_declares_them():
    hints = typing.get_type_hints(SaRAConfig)
    assert {name: hints[name] for name in REPORTED_FIELDS} == REPORTED_FIELDS


@pytest.mark.parametrize("selection", [{"trainable_fraction": 0.1}, {"threshold": 0.05}, {}])
def test_inspect_reports_the_selection_and_base_the_config_describes(tmp_path, capsys, selection):
    folder = save_tiny_adapter(tmp_path / "adapter", **selection)
    edit_config(folder, base_model_name_or_path="org/base")
    capsys.readouterr()
    assert cli.main(["inspect", str(folder), "--json", "--no-rank"]) == 0
    report = json.loads(capsys.readouterr().out)
    config = read_sara_config(folder)
    assert report["components"][0]["selection"] == config.selection_rule
    assert report["base_model"] == config.base_model_name_or_path == "org/base"


@pytest.mark.parametrize(
    "changes",
    [{"peft_type": "LORA"}, {"trainable_fraction": "0.1"}, {"base_model_name_or_path": 3}, {"threshold": True}],
    ids=["lora", "fraction-string", "base-number", "threshold-bool"],
)
def test_a_config_inspect_reads_is_refused_with_the_loaders_message(tmp_path, changes):
    folder = save_tiny_adapter(tmp_path / "adapter", trainable_fraction=0.1)
    edit_config(folder, **changes)
    with pytest.raises(InvalidAdapterError) as full:
        read_sara_config(folder)
    with pytest.raises(InvalidAdapterError) as reported:
        read_reported_config_fields(folder)
    assert str(reported.value) == str(full.value)


def test_inspect_imports_no_peft_diffusers_or_transformers(tmp_path):
    """In a fresh interpreter started as the console script: the report, and none of the heavy libraries loaded."""
    folder = save_tiny_adapter(tmp_path / "adapter", trainable_fraction=0.1)
    code = (
        "import sys; sys.argv = ['peft-sara']; from peft_sara import cli; "
        f"status = cli.main(['inspect', {str(folder)!r}, '--quiet']); "
        "heavy = sorted(name for name in ('peft', 'diffusers', 'transformers', 'bitsandbytes') if name in sys.modules); "
        "assert status == 0 and not heavy, (status, heavy)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "total: 2 layers" in done.stdout
