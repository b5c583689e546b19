"""Every GPU measurement of the project in one command, inside a time budget (default 7 minutes on one H100 / H200).

Four parts, run in this order, each in fresh processes forked from this one (so memory peaks are clean):

1. ``sd15``: one training step of the SD1.5-config UNet (random weights, 512 px = 64x64 latents, bf16) at batch 4 / 8 /
   1: frozen floor, full fine-tuning, LoRA r=8 and r=64, SHiRA, Super-Tuning, masked dense gradients and SaRA
   (``benchmarks/train_step.py``): step time and ``torch.cuda.max_memory_allocated``.
2. ``sdxl``: the SDXL-config UNet (2.6B parameters, 1024 px = 128x128 latents), batch 1, bf16 with gradient
   checkpointing: floor, full fine-tuning, LoRA r=8 and SaRA. A method that runs out of memory is recorded, not fatal.
3. ``sd15-compiled``: SaRA through ``torch.compile`` at batch 4, in the same tables as part 1.
4. ``kernels``: the sampled weight gradient, Triton against the PyTorch reference, and the out-of-place effective weight,
   at SD1.5 layer shapes, densities 0.1-50 %, bf16 / fp16 / fp32 and 1K-16K tokens (``benchmarks/kernels.py``), and
   the SDDMM / masked-GEMM density cutoff per dtype that these numbers favour. Its (dtype, tokens) cases run in
   priority order, so it also takes whatever time the other parts left.

Budget: part *i* must end by the start plus the sum of the shares of parts 1..*i*, so time an early part leaves unused
passes to the later ones. Before each case the suite estimates its duration from the cases already run (or a prior
guess, for the compilation) and skips it, with a note in the results, if it would end past its part's limit; a case
still running at the limit plus a short grace is killed and recorded as ``timeout``. Prints progress and tables, and
writes ``gpu_suite-<device>.json`` and ``gpu_suite-<device>.md`` to ``--out-dir``, else ``$OUT``, else ``benchmarks/results/``.

    python -m benchmarks.gpu_suite                          # on the GPU machine
    python -m benchmarks.gpu_suite --tiny --device cpu      # toy shapes on CPU (CI smoke test)
    python -m benchmarks.gpu_suite --parts sd15,sdxl --budget-s 300

One module per part (``training``: part 1, ``memory_at_scale``: part 2, ``compiled``: part 3, ``kernels``: part 4),
with what the step parts share in ``steps``, the time limit in ``budget``, the shapes and shares in ``settings``, the
markdown in ``report`` and the command in ``__main__``.
"""
