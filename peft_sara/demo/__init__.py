"""End-to-end SaRA demo on CPU: ``python -m peft_sara.demo`` (or ``peft-sara demo``).

Starts from a small class-conditional diffusion UNet pretrained on scikit-learn's 8x8 digits (shipped with the
package, ``pretrained/digits/``, made by ``pretrain_base.py``; other settings, or ``--dataset photo-patches`` on 16x16
patches of scikit-learn's two sample photos, pretrain one and cache it), teaches it a new style on some of the classes
with SaRA and with LoRA at the same trainable-parameter count, at three learning rates each, and measures along the
way what each learned (held-out loss on the new style) and what each kept (held-out loss on the other classes).
Writes the trade-off plot, sample grids scored by a small classifier, the adapters and metrics.json.

Layout: ``data.py`` (datasets and styles), ``diffusion.py`` (model, loss, sampling, pretraining cache),
``pretrain_base.py`` (the shipped base: made, recorded, checked), ``finetune.py`` (SaRA / LoRA set-up, the training
loop with checkpoints, the reload check), ``judge.py`` (the classifier that scores samples, Fréchet distance),
``settings.py`` (the knobs and the cache key), ``records.py`` (what a run carries between its steps), ``run.py`` (the
run, step by step), ``plots.py`` (pictures), ``metrics.py`` (metrics.json), ``report.py`` (the written report and
summary tables), ``cli.py`` (command line). The public names load on first use, so that ``python -m peft_sara.demo
--help`` answers at once.
"""

from __future__ import annotations

import importlib
from typing import Any

from .cli import main, run_from_args

_LAZY = {"DemoResult": "records", "DemoSettings": "settings", "run_demo": "run"}

__all__ = ["DemoResult", "DemoSettings", "main", "run_demo", "run_from_args"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
