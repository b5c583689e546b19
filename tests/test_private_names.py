"""The private PEFT / diffusers names peft-sara touches are listed in one place (``peft_sara.private_names``), and every
one of them exists in the installed versions: an upgrade that removes one fails here, naming it."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import Tensor, nn

from peft_sara.private_names import PRIVATE_NAMES, SOURCE_CHECKED

PACKAGE = Path(__file__).resolve().parent.parent / "peft_sara"


def _owner(spec: str):
    module_name, _, qualified = spec.partition(":")
    owner = importlib.import_module(module_name)
    for part in qualified.split(".") if qualified else ():
        owner = getattr(owner, part)
    return owner


@pytest.mark.parametrize(("owner", "name"), sorted(PRIVATE_NAMES), ids=lambda value: str(value))
def test_every_listed_private_name_exists_in_the_installed_libraries(owner, name):
    resolved = _owner(owner)
    if name in SOURCE_CHECKED:  # set or called at run time: still in the owner's source
        assert re.search(rf"\b{name}\b", inspect.getsource(resolved)), (owner, name)
    else:
        assert hasattr(resolved, name), (owner, name)


def test_the_package_touches_no_unlisted_private_peft_name():
    listed = {name for _, name in PRIVATE_NAMES}
    used = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name != "private_names.py":
            used |= set(re.findall(r"\b(_[a-z][a-z0-9_]*)\b", path.read_text()))
    peft_private = {
        name
        for name in used
        if any(hasattr(cls, name) for cls in (BaseTuner, BaseTunerLayer, PeftModel))
        and not any(hasattr(cls, name) for cls in (nn.Module, Tensor))  # torch's own
    }
    assert peft_private <= listed, sorted(peft_private - listed)
    assert not any("_getframe" in path.read_text() for path in PACKAGE.rglob("*.py"))


def test_the_package_writes_no_transformers_or_diffusers_flag_and_patches_no_save_pretrained():
    # Issue 27: the adapter API of transformers / diffusers is driven through its public methods only.
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for flag in ("_hf_peft_config_loaded", "_merged_adapters", "_lora_loadable_modules"):
            assert flag not in text, (path.name, flag)
        assert not re.search(r"\.save_pretrained\s*=", text), path.name
