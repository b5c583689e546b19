"""The SaRA tuner in PEFT's shape: what an upstream ``peft/tuners/sara/`` would hold.

``config.py`` (``SaRAConfig``), ``layer.py`` (``SaRALayer`` and its Linear / Conv classes, merge / unmerge, the public
update API), ``model.py`` (``SaRAModel``), ``functional.py`` (the op and its memory-saving backward), ``selection.py``
(which entries train), ``kernels/`` (the PyTorch reference and the Triton kernels), ``base_weight.py`` +
``quantized/`` (reading and merging plain, quantized, fp8 and offloaded base weights), ``regularizers.py`` (the
nuclear-norm loss) and ``peft_type.py`` (the ``PeftType.SARA`` member PEFT requires).
"""
