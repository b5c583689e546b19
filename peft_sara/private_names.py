"""Every private PEFT / diffusers name peft-sara touches, and why: the list an upgrade of either must be checked
against (``tests/test_private_names.py`` fails when one disappears, so CI says which).

Overridden ``BaseTuner`` hooks are PEFT's documented extension points for tuners, but they start with ``_`` and PEFT
may rename them in any release; they are listed too. Nothing in peft-sara reads PEFT's call stack or a caller's locals,
and nothing writes a private attribute of transformers or diffusers: components get adapters through diffusers'
``add_adapter`` or PEFT's ``inject_adapter_in_model`` and are fused through ``pipe.fuse_lora`` (``peft_sara.injection``,
``peft_sara.pipelines``); ``pipe.save_pretrained`` is not patched (removed with ``save_bridge``, issue 27).
"""

from __future__ import annotations

# (owner, name) -> why peft-sara needs it. `owner` is "module:qualified.object" for attributes, "module" for functions.
PRIVATE_NAMES: dict[tuple[str, str], str] = {
    # --- BaseTuner hooks SaRAModel overrides (model.py)
    ("peft.tuners.tuners_utils:BaseTuner", "_create_and_replace"): "wrap one target module in a SaRA layer",
    ("peft.tuners.tuners_utils:BaseTuner", "_replace_module"): "keep an offloaded adapter off the meta device",
    ("peft.tuners.tuners_utils:BaseTuner", "_check_new_adapter_config"): "task_type and kernel agreement (no file I/O)",
    ("peft.tuners.tuners_utils:BaseTuner", "_prepare_adapter_config"): "diffusers default target_modules",
    ("peft.tuners.tuners_utils:BaseTuner", "_pre_injection_hook"): "record the base model id and class in the config",
    ("peft.tuners.tuners_utils:BaseTuner", "_post_injection_hook"): "tags, tied layers (merge groups)",
    ("peft.tuners.tuners_utils:BaseTuner", "_get_adapter_state_dict"): "encode indices, add shape / layout / checksum",
    ("peft.tuners.tuners_utils:BaseTuner", "_remap_adapter_state_dict_for_load"): "validate before any value loads",
    ("peft.tuners.tuners_utils:BaseTuner", "_unload_and_optionally_merge"): "refuse an unsafe merge before any",
    ("peft.peft_model:PeftModel", "_enable_peft_forward_hooks"): "refuse adapter_names= (not supported)",
    # --- BaseTunerLayer state and helpers (layer.py)
    # set at creation as PEFT's own layers do (no public setter exists before the layer is set up)
    ("peft.tuners.tuners_utils:BaseTunerLayer", "_active_adapter"): (
        "the new layer's active adapter (set in __init__); hotswap's slot rename (no public rename in PEFT)"
    ),
    ("peft.tuners.tuners_utils:BaseTunerLayer", "_disable_adapters"): (
        "a new layer starts enabled (set in __init__, as PEFT's own layers do; read through `disable_adapters`)"
    ),
    ("peft.tuners.tuners_utils:BaseTunerLayer", "_move_adapter_to_device_of_base_layer"): "device of new adapters",
    ("peft.tuners.tuners_utils", "_get_in_out_features"): "in/out features of every supported base layer",
    # --- the PeftType enum (peft_type.py): PEFT has no plugin registry for method names
    ("peft.utils.peft_types:PeftType", "_member_map_"): "add the SARA member to the enum",
    ("peft.utils.peft_types:PeftType", "_value2member_map_"): "add the SARA member to the enum",
    ("peft.utils.peft_types:PeftType", "_member_names_"): "add the SARA member to the enum",
}

# Names the owner sets or calls at run time rather than defines: checked in the owner's source.
SOURCE_CHECKED = {"_active_adapter", "_disable_adapters", "_enable_peft_forward_hooks"}

__all__ = ["PRIVATE_NAMES", "SOURCE_CHECKED"]
