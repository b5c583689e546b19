"""Writing a SaRA adapter in the formats other tools read.

| format      | written                                    | read by                                                  |
|-------------|--------------------------------------------|----------------------------------------------------------|
| ``peft-lora``  | a PEFT LoRA folder (one per component)  | ``PeftModel.from_pretrained``, diffusers ``load_lora_adapter`` |
| ``diffusers``  | ``pytorch_lora_weights.safetensors``    | ``pipe.load_lora_weights(folder)``                       |
| ``kohya``      | one ``.safetensors``, ``lora_unet_*``   | ComfyUI, A1111 / Forge, kohya tools, ``load_lora_weights``  |
| ``diff``       | one ``.safetensors``, ``*.diff`` (dense) | ComfyUI, A1111 / Forge (not diffusers: it drops ``.diff``) |
| ``merged``     | ``save_pretrained`` of the merged model | everything that loads the base model                     |

LoRA formats come from :func:`convert_to_lora` (truncated SVD, :mod:`peft_sara.export.lowrank`); ``diff`` is exact.
Every file is written atomically, every folder as one unit (:mod:`peft_sara.atomic`).
"""

from __future__ import annotations

import collections
import functools
import inspect
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from tqdm.auto import tqdm

from ..adapter_files import write_adapter_config
from ..atomic import folder_writer, save_safetensors_atomic
from ..constants import SAFETENSORS_NAME, __version__
from ..layouts import LayerLayout
from .files import resolve_export_source
from .lowrank import LayerFactors, LoRAExport, Rank, delta_matrix, factorize_source, parse_rank
from .merged import write_merged
from .sources import ComponentUpdates, ExportSource

PEFT_LORA, DIFFUSERS, KOHYA, DIFF, MERGED = "peft-lora", "diffusers", "kohya", "diff", "merged"
FORMATS = (PEFT_LORA, DIFFUSERS, KOHYA, DIFF, MERGED)
FOLDER_FORMATS = (PEFT_LORA, DIFFUSERS, MERGED)
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PEFT_KEY_PREFIX = "base_model.model."
# kohya files carry one alpha for every layer (scale = alpha / rank); the factors are scaled to match.
KOHYA_ALPHA = 1.0
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------- names
def kohya_prefix(component: str, components: Sequence[str]) -> str:
    """The key prefix kohya sd-scripts / OneTrainer / ComfyUI use for a pipeline component."""
    if component == "unet":
        return "lora_unet_"
    if component == "transformer":
        return "lora_transformer_"  # OneTrainer's naming, read by ComfyUI for SD3 / Flux
    if component == "text_encoder":
        return "lora_te1_" if "text_encoder_2" in components else "lora_te_"
    if component == "text_encoder_2":
        return "lora_te2_"
    raise ValueError(
        f"kohya-style files have no key prefix for the component '{component}' (known: unet, transformer, "
        "text_encoder, text_encoder_2). Export it with format 'peft-lora' or 'diffusers'."
    )


def kohya_key(component: str, components: Sequence[str], file_name: str) -> str:
    """``lora_unet_down_blocks_0_resnets_0_conv1``-style name of one layer (``file_name``: its module path in files,
    :attr:`ComponentUpdates.file_prefix` included)."""
    return kohya_prefix(component, components) + file_name.replace(".", "_")


# ------------------------------------------------------------------------------------------------- layers LoRA cannot run
# diffusers calls some Linear layers by keyword (AnimateDiff's motion modules: `self.proj_in(input=hidden_states)`);
# PEFT's LoRA layers take the input positionally (`forward(self, x, ...)`), so a LoRA on them fails at inference.
# From files alone (no model to read), these layers are recognised by their names.
KEYWORD_CALLED_NAMES = re.compile(r"(^|\.)motion_modules\.\d+\.(proj_in|proj_out)$")


@functools.cache
def _keyword_called_children(cls: type) -> frozenset[str]:
    """Attributes that ``cls.forward`` calls with ``input=`` (``self.proj_in(input=...)``)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return frozenset()
    return frozenset(re.findall(r"self\.(\w+)\(\s*input\s*=", source))


def keyword_called_layers(source: ExportSource) -> list[str]:
    """Exported layers (``component.layer``) that diffusers calls with ``input=``, where a LoRA cannot run."""
    found = []
    for component, parts in source.components.items():
        module = source.modules.get(component)
        for name in parts.layers:
            if module is not None:
                parent_name, _, child = name.rpartition(".")
                try:
                    parent = module.get_submodule(parent_name) if parent_name else module
                except AttributeError:
                    parent = None
                called = parent is not None and child in _keyword_called_children(type(parent))
            else:
                called = bool(KEYWORD_CALLED_NAMES.search(name))
            if called:
                found.append(f"{component}.{name}" if component else name)
    return found


def _warn_keyword_called(source: ExportSource, format: str) -> None:
    layers = keyword_called_layers(source)
    if layers:
        warnings.warn(
            f"The {format} export carries {len(layers)} layers that diffusers calls with a keyword argument "
            f"(`proj_in(input=...)`, e.g. '{layers[0]}'), which PEFT's LoRA layers do not accept: loading it into "
            "diffusers works, but inference fails there. ComfyUI and A1111 apply these layers ('kohya' / 'diff' "
            "files); in diffusers, load the SaRA adapter itself (`peft_sara.load_sara_adapter` runs these layers).",
            UserWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------------- results
@dataclass
class ExportResult:
    """What an export wrote and how exact it is."""

    format: str
    paths: list[Path]
    lora: LoRAExport | None = None
    layers: list[dict] = field(default_factory=list)  # the diff format's per-layer report

    def summary(self) -> dict:
        """JSON-ready report (per-layer ranks and errors for LoRA formats)."""
        report = {"format": self.format, "paths": [str(path) for path in self.paths]}
        if self.lora is not None:
            report.update(self.lora.summary())
        else:
            report.update({"rank": "dense", "total_relative_error": 0.0, "layers": self.layers})
        return report


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous()


def _metadata(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"format": "pt", "peft_sara_version": __version__, **(extra or {})}


# ------------------------------------------------------------------------------------------------- writers
def lora_config_for(
    layers: dict[str, LayerFactors], layouts: dict[str, LayerLayout], base_model: str | None
) -> LoraConfig:
    """A ``LoraConfig`` for one component's factors: exact target names, per-layer ranks, alpha equal to rank (scale
    1) everywhere, written out so that no reader has to guess the scale. Names match with and without a file prefix
    (PEFT matches ``text_model.encoder...`` to the target ``encoder...``)."""
    ranks = {name: factors.rank for name, factors in layers.items() if factors.rank}
    common = collections.Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {name: rank for name, rank in ranks.items() if rank != common}
    transposed = [layouts[name].transposed for name, factors in layers.items() if factors.rank]
    return LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),  # alpha = rank: the scale is 1, the factors hold the whole update
        target_modules=sorted(ranks),
        fan_in_fan_out=bool(transposed) and all(transposed),
        base_model_name_or_path=base_model,
        init_lora_weights=True,
    )


def _layouts(parts: ComponentUpdates) -> dict[str, LayerLayout]:
    return {name: layer.layout for name, layer in parts.layers.items()}


def write_peft_lora(
    export: LoRAExport, output_dir: str | os.PathLike, source: ExportSource, dtype: torch.dtype | None = None
) -> list[Path]:
    """PEFT LoRA folder(s): the root for a single model, one subfolder per component for a pipeline."""
    written = []
    with folder_writer(output_dir) as staging:  # every component published as one unit
        for component, layers in export.components.items():
            directory = staging if source.single_model else staging / component
            tensors = {}
            for name, factors in layers.items():
                if factors.rank:
                    tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = _cast(factors.down, dtype)
                    tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = _cast(factors.up, dtype)
            directory.mkdir(parents=True, exist_ok=True)
            save_safetensors_atomic(tensors, directory / SAFETENSORS_NAME, metadata=_metadata())
            parts = source.components[component]
            config = lora_config_for(layers, _layouts(parts), parts.base_model)
            write_adapter_config(config, directory)
            written.append(Path(output_dir) if source.single_model else Path(output_dir) / component)
    return written


def diffusers_state_dict(
    export: LoRAExport, source: ExportSource, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``<component>.<module>.lora_A.weight`` / ``lora_B`` tensors, as diffusers' ``save_lora_weights`` writes them."""
    tensors = {}
    for component, layers in export.components.items():
        for name, factors in layers.items():
            if factors.rank:
                key = f"{component}.{source.components[component].file_prefix}{name}"
                tensors[f"{key}.lora_A.weight"] = _cast(factors.down, dtype)
                tensors[f"{key}.lora_B.weight"] = _cast(factors.up, dtype)
    return tensors


def diffusers_metadata(export: LoRAExport, source: ExportSource) -> dict[str, str]:
    """The header diffusers' ``save_lora_weights`` writes: each component's ``LoraConfig`` (ranks and alphas, as
    ``<component>.<field>``) under ``lora_adapter_metadata``. With it, readers take the alphas from the file instead
    of guessing them (diffusers changed its guess for mixed-rank files without alphas in 0.40)."""
    fields = {}
    for component, layers in export.components.items():
        parts = source.components[component]
        config = lora_config_for(layers, _layouts(parts), parts.base_model).to_dict()
        for key, value in config.items():
            fields[f"{component}.{key}"] = sorted(value) if isinstance(value, set) else value
    return _metadata({DIFFUSERS_METADATA_KEY: json.dumps(fields, indent=2, sort_keys=True)})


def kohya_state_dict(
    export: LoRAExport, source: ExportSource, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``lora_unet_*`` / ``lora_te_*`` tensors with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``."""
    tensors = {}
    names = list(export.components)
    for component, layers in export.components.items():
        for name, factors in layers.items():
            if not factors.rank:
                continue
            key = kohya_key(component, names, source.components[component].file_prefix + name)
            # readers scale by alpha / rank: fold rank / alpha into the factors, evenly
            gain = (factors.rank / KOHYA_ALPHA) ** 0.5
            tensors[f"{key}.lora_down.weight"] = _cast(factors.down * gain, dtype)
            tensors[f"{key}.lora_up.weight"] = _cast(factors.up * gain, dtype)
            tensors[f"{key}.alpha"] = torch.tensor(KOHYA_ALPHA, dtype=dtype or torch.float32)
    return tensors


def kohya_metadata(export: LoRAExport, base_model: str | None) -> dict[str, str]:
    """The ``ss_*`` header fields UIs show for kohya files (network module, dimension, alpha)."""
    ranks = [factors.rank for _, factors in export.layers() if factors.rank]
    return _metadata(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(max(ranks, default=0)),
            "ss_network_alpha": str(KOHYA_ALPHA),
            "ss_base_model": base_model or "",
            "peft_sara_export": json.dumps({"rank": export.rank, "total_relative_error": export.total_error}),
        }
    )


def diff_state_dict(
    source: ExportSource, dtype: torch.dtype | None = None, progress: bool = False
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """``<kohya name>.diff`` dense weight differences (exact), and a per-layer report."""
    names = list(source.components)
    tensors, report = {}, []
    for component_name, name, layer in tqdm(source.layers(), desc="dense differences", disable=not progress):
        update = layer.read_update()
        dense = update.to_dense()
        key = kohya_key(component_name, names, source.components[component_name].file_prefix + name)
        tensors[f"{key}.diff"] = _cast(dense, dtype)
        norm = float(torch.linalg.vector_norm(delta_matrix(update)))
        report.append({"component": component_name, "module": name, "delta_norm": norm, "relative_error": 0.0})
    return tensors, report


def export_adapter(
    source: Any,
    output: str | os.PathLike,
    format: str,
    rank: Rank = "full",
    adapter_name: str | None = None,
    component: str | None = None,
    components: Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
) -> ExportResult:
    """Write a SaRA adapter in another tool's format (see the module docstring for the table).

    Args:
        source: A ``DiffusionPipeline`` with a SaRA adapter, a ``PeftModel``, a model with an injected adapter, or an
            adapter's files (:func:`peft_sara.conversion.read_adapter_files`; every format but ``merged``).
        output: A folder for ``peft-lora`` / ``diffusers``, a ``.safetensors`` file for ``kohya`` / ``diff``.
        format: One of :data:`FORMATS`.
        rank: LoRA rank for the LoRA formats (see :func:`convert_to_lora`); ignored by ``diff``.
        adapter_name: Which adapter (may be omitted when there is one).
        component: For a single model, the pipeline component it is (default: from its class).
        components: For a pipeline, only these components.
        dtype: Tensor dtype in the file (``"float16"``, ``"bfloat16"``, ``"float32"``; default: float32).
        progress: Show progress bars.
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    output = Path(output)
    if format in FOLDER_FORMATS and output.suffix == ".safetensors":
        raise ValueError(f"Format '{format}' writes a folder, but '{output}' names a .safetensors file.")
    if format not in FOLDER_FORMATS and output.suffix != ".safetensors":
        raise ValueError(f"Format '{format}' writes one .safetensors file; '{output}' does not end in .safetensors.")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    resolved = resolve_export_source(source, adapter_name, component, components)

    if format == MERGED:
        return ExportResult(format, [write_merged(resolved, output)], layers=[])
    if format == DIFF:
        tensors, report = diff_state_dict(resolved, dtype, progress)
        save_safetensors_atomic(tensors, output, metadata=_metadata({"peft_sara_export": "dense weight differences"}))
        return ExportResult(format, [output], layers=report)

    if format in (PEFT_LORA, DIFFUSERS):
        _warn_keyword_called(resolved, format)
    export = factorize_source(resolved, parse_rank(rank), progress)
    if format == PEFT_LORA:
        return ExportResult(format, write_peft_lora(export, output, resolved, dtype), export)
    if format == DIFFUSERS:
        output.mkdir(parents=True, exist_ok=True)
        path = output / DIFFUSERS_WEIGHT_NAME
        tensors = diffusers_state_dict(export, resolved, dtype)
        save_safetensors_atomic(tensors, path, metadata=diffusers_metadata(export, resolved))
        return ExportResult(format, [path], export)
    save_safetensors_atomic(
        kohya_state_dict(export, resolved, dtype), output, metadata=kohya_metadata(export, resolved.base_model)
    )
    return ExportResult(format, [output], export)


__all__ = [
    "FORMATS",
    "ExportResult",
    "export_adapter",
    "diffusers_state_dict",
    "diffusers_metadata",
    "kohya_state_dict",
    "diff_state_dict",
    "kohya_key",
    "lora_config_for",
]
