"""End-to-end SaRA demo on CPU: ``python -m peft_sara.demo`` (or ``peft-sara demo``).

Pretrains (once, then cached) a small class-conditional diffusion UNet on scikit-learn's 8x8 digits (or, with
``--dataset photo-patches``, on 16x16 patches of scikit-learn's two sample photos), teaches it a new style on some of
the classes with SaRA and with LoRA at the same trainable-parameter count, at three learning rates each, and measures
along the way what each learned (held-out loss on the new style) and what each kept (held-out loss on the other
classes). Writes the trade-off plot, sample grids scored by a small classifier, the adapters and metrics.json.

Layout: ``data.py`` (datasets and styles), ``diffusion.py`` (model, loss, sampling, pretraining cache),
``finetune.py`` (SaRA / LoRA set-up, the training loop with checkpoints, the reload check), ``judge.py`` (the
classifier that scores samples, Fréchet distance), ``settings.py`` (the knobs and the cache key), ``records.py`` (what
a run carries between its steps), ``run.py`` (the run, step by step), ``plots.py`` (pictures), ``metrics.py``
(metrics.json), ``report.py`` (the written report and summary tables), ``cli.py`` (command line).
"""

from .cli import main, run_from_args
from .records import DemoResult
from .run import run_demo
from .settings import DemoSettings

__all__ = ["DemoResult", "DemoSettings", "main", "run_demo", "run_from_args"]
