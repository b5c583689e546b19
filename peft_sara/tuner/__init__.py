"""The SaRA tuner in PEFT's shape: what an upstream ``peft/tuners/sara/`` would hold.

``config.py`` (``SaRAConfig``), ``targets.py`` (the default-target rule), ``selection.py`` (which entries train),
``kernels/`` (the PyTorch reference, with the one ``cast(w + s*delta)`` formula, and the Triton kernels),
``functional.py`` (the op and its memory-saving backward), ``base_weight.py`` + ``quantized/`` (each layer's storage
backend and the off / main / composable decision), ``layer.py`` (``SaRALayer`` and its Linear /
Conv classes: entries, re-selection, merge / unmerge, the public update API), ``entry_storage.py`` (the containers), ``model.py`` (``SaRAModel``), ``file_format.py`` (the state
dict's keys and index encoding), ``reader.py`` (the one reader of stored entries), ``transaction.py``
(all-or-nothing injections and loads), ``config_checks.py``, ``regularizers.py`` (the nuclear-norm loss),
``peft_type.py`` (the ``PeftType.SARA`` member PEFT requires) and ``names.py`` (names and choices, importing nothing).
"""
