"""peft-sara: SaRA (progressive sparse low-rank adaptation) as a PEFT method.

Importing this package registers the ``"sara"`` method with PEFT, so that ``get_peft_model``,
``PeftModel.from_pretrained``, ``inject_adapter_in_model`` and diffusers' ``add_adapter`` accept ``SaRAConfig``.

Layers, bottom to top (nothing imports upward; ``lint-imports`` checks it): ``constants`` / ``peft_type`` /
``config`` / ``masks`` -> ``kernels`` -> ``functional`` (the sparse-update op) -> ``base_weight``
-> ``layer`` -> tuner (``serialization``, ``save_bridge``, ``validation``, ``model``, ``merging``,
``regularizers``, ``registration``) -> integrations (``cards``, ``resolve``, ``hotswap``, ``pipelines``, ``export``,
``hub``, ``conversion``) -> ``training`` -> applications (``cli``, ``commands``, ``demo``). The import-linter contract in
``pyproject.toml`` is the exact list.
"""

from .cards import sara_model_card
from .checkpoint_checks import allow_non_finite_values
from .config import SaRAConfig
from .constants import __version__
from .file_format import InvalidAdapterError
from .hotswap import enable_sara_hotswap, hotswap_adapter
from .hub import push_sara_adapter
from .layer import Conv, Linear, SaRALayer, SparseUpdate, sara_layers
from .model import SaRAModel
from .pipelines import load_sara_adapter, save_sara_adapter
from .registration import register

PEFT_TYPE = register()

__all__ = [
    "SaRAConfig",
    "SaRAModel",
    "SaRALayer",
    "SparseUpdate",
    "Linear",
    "Conv",
    "sara_layers",
    "PEFT_TYPE",
    "__version__",
    "load_sara_adapter",
    "enable_sara_hotswap",
    "hotswap_adapter",
    "save_sara_adapter",
    "push_sara_adapter",
    "sara_model_card",
    "InvalidAdapterError",
    "allow_non_finite_values",
]
