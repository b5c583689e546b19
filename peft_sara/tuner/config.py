"""Configuration of a SaRA adapter."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import InitVar, asdict, dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig

from .names import DEFAULT_THRESHOLD, KERNELS, RANK_METHODS, RANK_TARGETS, SAVE_DTYPES, selection_rule
from .peft_type import sara_peft_type

# PEFT's bookkeeping, which its save_pretrained fills in after the weights are written, and the fingerprint itself.
UNFINGERPRINTED_FIELDS = frozenset(
    ("base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version", "config_fingerprint")
)


def _canonical(value: Any) -> Any:
    """A JSON-ready value that is the same for a setting as written and as read back (sets as sorted lists)."""
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(item) for item in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _canonical(item) for key, item in value.items()}
    if isinstance(value, str):  # PEFT's enums (PeftType, TaskType) are str subclasses
        return str(value.value) if hasattr(value, "value") else str(value)
    return value


@dataclass
class SaRAConfig(PeftConfig):
    """Configuration for [`SaRAModel`]: sparse fine-tuning of the small ("temporarily ineffective") pre-trained weights.

    The trainable set of every targeted weight is chosen by exactly one of `threshold` (the paper's global absolute
    rule, |w| < threshold) or `trainable_fraction` (the smallest fraction of each weight by magnitude). If neither is
    given, `threshold=2e-3` is used, as in the paper.

    Args:
        threshold (`float`, *optional*):
            Entries with `|w| < threshold` are trainable. The paper uses 2e-3 (~6% of SD1.5's UNet), 8e-4 and 2e-4.
            Compared in float32, whatever the base dtype.
        trainable_fraction (`float`, *optional*):
            In (0, 1]: train the `round(fraction * numel)` smallest-magnitude entries of each weight (at least one).
            More robust than a global threshold across models whose weight scales differ.
        target_modules (`list[str]` or `str`, *optional*):
            Modules to adapt: a list of exact names or dotted suffixes, or a full-match regex. `None` adapts every
            Linear / ungrouped Conv inside the model's repeated blocks, except modulation, norms and embeddings
            (`peft_sara.tuner.targets`: any diffusers denoiser or transformers text encoder); the saved config lists
            the layers this picked.
        exclude_modules (`list[str]` or `str`, *optional*): Modules never to adapt (same matching rules).
        modules_to_save (`list[str]`, *optional*): Extra modules trained in full and saved with the adapter.
        layers_to_transform (`list[int]` or `int`, *optional*): Only adapt these layer indices (list targets only).
        layers_pattern (`list[str]` or `str`, *optional*): Name of the layer list used by `layers_to_transform`.
        init_weights (`bool`):
            `True` (default) starts the sparse update at zero, so the adapted model equals the base model. `False`
            draws small random values (for tests that need a non-identity adapter).
        save_dtype (`str`, *optional*):
            Store the trainable values as `"float16"`, `"bfloat16"` or `"float32"` in `adapter_model.safetensors`.
            `None` keeps the training dtype (float32). Values are cast back to float32 on load.
        kernel (`str`, *optional*):
            Deprecated: the kernel is a runtime choice, not part of the adapter. Use
            `peft_sara.set_sara_kernel(model, "auto" | "triton" | "reference")` or the environment variable
            `PEFT_SARA_KERNEL` (which overrides everything). Not saved; configs that carry it still load.
        lambda_rank (`float`):
            Weight of the nuclear-norm low-rank loss on each layer's sparse update. 0 disables it. The paper's
            appendix uses 5e-3, the official training script 5e-4.
        rank_layers_per_step (`int` or `"all"`):
            How many qualifying layers the low-rank loss samples per step (the official code: 1).
        rank_min_dim (`int`): A layer qualifies for the low-rank loss if min(out, in * prod(kernel)) > this (64).
        rank_target_modules (`list[str]` or `str`, *optional*):
            Restrict the low-rank loss to these adapted modules (suffix list or full-match regex). `None`: all that
            qualify by `rank_min_dim`. The official code uses Linear layers only: pass a regex to reproduce that.
        rank_method (`str`): `"svd"` (exact) or `"randomized"` (rank-`rank_oversample` randomized SVD, cheaper).
        rank_oversample (`int`): Rank of the randomized approximation when `rank_method="randomized"`.
        rank_target (`str`):
            `"delta"` (default) puts the nuclear norm on the sparse update; `"masked_weight"` on the trainable entries
            of the effective weight, as written in the paper.
        progressive_step (`int`, *optional*): Training step of the progressive re-selection. Overrides
            `progressive_fraction`.
        progressive_fraction (`float`, *optional*):
            Re-select after this fraction of the planned training steps (default 0.5, the paper's choice). `None`
            together with `progressive_step=None` disables re-selection.
        base_model_class (`str`, *optional*):
            Set at injection: the class name of the model adapted (`UNet2DConditionModel`, `CLIPTextModel`, ...), so
            that an adapter's files alone tell which pipeline component it adapts (exports without the base model).
        config_fingerprint (`str`, *optional*):
            Written, never set: `to_dict()` (so `adapter_config.json`) holds the SHA-256 of the config's settings
            (:meth:`settings_fingerprint`), and the saved weights the same value (`sara_config_fingerprint`), so a
            reader refuses weights and a config of two different saves (a `save_pretrained` killed between its two
            files). Read back from a file, it holds what the file says.
    """

    threshold: float | None = field(default=None, metadata={"help": "Train entries with |w| < threshold."})
    trainable_fraction: float | None = field(
        default=None, metadata={"help": "Train the smallest fraction of each weight by magnitude."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (list, suffixes) or a full-match regex to adapt."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex never to adapt."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt (list targets only)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list that layers_to_transform indexes."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Zero-initialise the update (identity adapter); False for random tests."}
    )
    save_dtype: str | None = field(
        default=None, metadata={"help": "Dtype of stored values: float32, float16 or bfloat16."}
    )
    # Not a field (never saved): which kernel runs is the runtime's choice (`peft_sara.set_sara_kernel`,
    # `PEFT_SARA_KERNEL`). Still accepted here, and from configs saved before, with a deprecation warning.
    kernel: InitVar[Literal["auto", "triton", "reference"] | None] = None
    lambda_rank: float = field(default=0.0, metadata={"help": "Weight of the nuclear-norm low-rank loss."})
    rank_layers_per_step: int | str = field(
        default=1, metadata={"help": "Layers sampled per step by the low-rank loss, or 'all'."}
    )
    rank_min_dim: int = field(default=64, metadata={"help": "Minimum matrix dimension for the low-rank loss."})
    rank_target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Adapted modules the low-rank loss may sample (None: all that qualify)."}
    )
    rank_method: Literal["svd", "randomized"] = field(
        default="svd", metadata={"help": "Exact SVD or randomized low-rank SVD for the nuclear-norm subgradient."}
    )
    rank_oversample: int = field(default=32, metadata={"help": "Rank of the randomized SVD."})
    rank_target: Literal["delta", "masked_weight"] = field(
        default="delta", metadata={"help": "Nuclear norm of the sparse update or of the masked effective weight."}
    )
    progressive_step: int | None = field(
        default=None, metadata={"help": "Step of the progressive re-selection (overrides progressive_fraction)."}
    )
    progressive_fraction: float | None = field(
        default=0.5, metadata={"help": "Re-select after this fraction of the planned steps; None disables."}
    )
    base_model_class: str | None = field(
        default=None,
        metadata={"help": "Class name of the model the adapter was injected into (set at injection; read by exports)."},
    )
    # What a saved adapter_config.json says (None for configs built in code); `to_dict` always writes the current one.
    config_fingerprint: str | None = field(
        default=None,
        compare=False,
        repr=False,
        metadata={"help": "Written on save: the SHA-256 of the settings, matched by the weights file's record."},
    )

    def __post_init__(self, kernel: str | None = None) -> None:
        super().__post_init__()
        if kernel is not None and kernel not in KERNELS:
            raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}.")
        if kernel not in (None, "auto"):
            warnings.warn(
                "`SaRAConfig(kernel=...)` is deprecated: the kernel is a runtime choice, not part of the adapter. Call "
                "`peft_sara.set_sara_kernel(model, kernel)` after injecting, or set PEFT_SARA_KERNEL.",
                FutureWarning,
                stacklevel=3,
            )
        # The kernel the layers start with (an instance attribute, never saved).
        self.kernel = kernel or "auto"
        self.peft_type = sara_peft_type()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, set(value))

        if self.threshold is not None and self.trainable_fraction is not None:
            raise ValueError(
                f"Pass exactly one of `threshold` ({self.threshold}) and `trainable_fraction` "
                f"({self.trainable_fraction}), not both."
            )
        if self.threshold is None and self.trainable_fraction is None:
            self.threshold = DEFAULT_THRESHOLD
        if self.threshold is not None and not self.threshold > 0:
            raise ValueError(f"`threshold` must be > 0, got {self.threshold}.")
        if self.trainable_fraction is not None and not 0 < self.trainable_fraction <= 1:
            raise ValueError(f"`trainable_fraction` must be in (0, 1], got {self.trainable_fraction}.")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("`layers_pattern` only applies together with `layers_to_transform`.")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex string.")
        if self.save_dtype is not None and self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"`save_dtype` must be one of {SAVE_DTYPES} or None, got {self.save_dtype!r}.")
        if self.lambda_rank < 0:
            raise ValueError(f"`lambda_rank` must be >= 0, got {self.lambda_rank}.")
        if not (
            self.rank_layers_per_step == "all"
            or (isinstance(self.rank_layers_per_step, int) and self.rank_layers_per_step > 0)
        ):
            raise ValueError(
                f"`rank_layers_per_step` must be a positive int or 'all', got {self.rank_layers_per_step!r}."
            )
        if self.rank_method not in RANK_METHODS:
            raise ValueError(f"`rank_method` must be one of {RANK_METHODS}, got {self.rank_method!r}.")
        if self.rank_target not in RANK_TARGETS:
            raise ValueError(f"`rank_target` must be one of {RANK_TARGETS}, got {self.rank_target!r}.")
        if self.rank_oversample < 1:
            raise ValueError(f"`rank_oversample` must be >= 1, got {self.rank_oversample}.")
        if self.progressive_step is not None and self.progressive_step < 1:
            raise ValueError(f"`progressive_step` must be >= 1, got {self.progressive_step}.")
        if self.progressive_fraction is not None and not 0 < self.progressive_fraction < 1:
            raise ValueError(f"`progressive_fraction` must be in (0, 1), got {self.progressive_fraction}.")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> SaRAConfig:
        """PEFT's ``from_pretrained``, for a config read from a file: it remembers where it was read from
        (``loaded_from``: path or repo id, ``subfolder`` and the Hub arguments), so that SaRA's tuner can check the
        weights file before PEFT injects the adapter, and it runs with the default ``kernel``: which kernel runs is
        the runtime's choice, not the file's (a ``"triton"`` saved on a GPU machine must not break CPU forwards)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.kernel = "auto"
        # An instance attribute, not a field (never saved); configs built in code have none.
        config.loaded_from = {"path": str(pretrained_model_name_or_path), "subfolder": subfolder, **kwargs}
        return config

    def settings_fingerprint(self) -> str:
        """SHA-256 (hex) of every setting that says what the saved weights are and how they train: all fields but
        PEFT's bookkeeping (``base_model_name_or_path``, ``revision``, ``inference_mode``, ``auto_mapping``,
        ``peft_version``, which PEFT fills in while it saves) and this fingerprint. The weights file records it too
        (``peft_sara.tuner.file_format``): a config and weights of two different saves are refused together."""
        settings = {key: _canonical(value) for key, value in asdict(self).items() if key not in UNFINGERPRINTED_FIELDS}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``to_dict`` (what ``adapter_config.json`` holds) with the current :meth:`settings_fingerprint`."""
        output = super().to_dict()
        output["config_fingerprint"] = self.settings_fingerprint()
        return output

    @property
    def selection_rule(self) -> str:
        """Human-readable description of how the trainable set is chosen."""
        return selection_rule(self.threshold, self.trainable_fraction)
