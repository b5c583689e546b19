"""peft-sara: SaRA (progressive sparse low-rank adaptation) as a PEFT method.

Importing this package registers the ``"sara"`` method with PEFT, so that ``get_peft_model``,
``PeftModel.from_pretrained``, ``inject_adapter_in_model`` and diffusers' ``add_adapter`` accept ``SaRAConfig``.
"""

from .config import SaRAConfig
from .diffusers_utils import load_sara_adapter, save_sara_adapter
from .hub import push_sara_adapter, sara_model_card
from .layer import Conv, Linear, SaRALayer
from .model import SaRAModel
from .registration import register

__version__ = "0.1.0"

PEFT_TYPE = register()

__all__ = [
    "SaRAConfig", "SaRAModel", "SaRALayer", "Linear", "Conv", "PEFT_TYPE", "__version__",
    "load_sara_adapter", "save_sara_adapter", "push_sara_adapter", "sara_model_card",
]
