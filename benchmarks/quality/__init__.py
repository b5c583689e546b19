"""Evidence for the paper's claims on real data anyone can rerun on a CPU: ``python -m benchmarks.quality.run_all``.

``ineffective.py`` (are the small weights ineffective?), ``tradeoff.py`` (adaptation vs preservation against LoRA,
full fine-tuning, Super-Tuning and SHiRA; sample quality), ``ablation.py`` (the paper's Table 2 and the rank of the
update), ``run_all.py`` (everything, plus the summary table). Shared: ``common.py`` (settings, context, jobs, worker
pool), ``methods.py`` (the methods), ``analysis.py`` (fronts, matched comparisons), ``plots.py``, ``rank.py``.
"""
