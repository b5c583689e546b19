"""Implementation of :mod:`peft_sara.conversion` (import from there): ``lowrank`` (SVD factors and errors),
``formats`` (file writers), ``merged`` (merged models), ``sources`` (what is exported, loading from folders),
``adapter_stats`` (``peft-sara inspect``), ``weight_analysis`` (``peft-sara analyze``)."""
