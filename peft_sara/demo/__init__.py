"""End-to-end SaRA demo on CPU: ``python -m peft_sara.demo`` (or ``peft-sara-demo``).

Pretrains (once, then cached) a small class-conditional diffusion UNet on scikit-learn's 8x8 digits, teaches it a
new style on half of the classes with SaRA and with LoRA at the same trainable-parameter count, measures the new-style
loss and the forgetting on the other classes, and writes sample grids, the adapters, a loss plot and metrics.json.

Layout: ``data.py`` (digits and styles), ``diffusion.py`` (model, loss, sampling, pretraining cache),
``finetune.py`` (SaRA / LoRA set-up, the training loop, the reload check), ``report.py`` (pictures and tables),
``settings.py`` (the knobs and the cache key), ``run.py`` (the run, step by step), ``metrics.py`` (metrics.json),
``cli.py`` (command line).
"""

from .cli import main, run_from_args
from .run import DemoResult, run_demo
from .settings import DemoSettings

__all__ = ["DemoResult", "DemoSettings", "main", "run_demo", "run_from_args"]
