"""Plans as text: one plan's breakdown, and a comparison table of many (Markdown, for the READMEs)."""

from __future__ import annotations

from collections.abc import Sequence

from .plan import PARTS, MemoryPlan

GIB = 2**30


def gib(num_bytes: int) -> str:
    """Bytes in GiB with two decimals."""
    return f"{num_bytes / GIB:.2f}"


def format_plan(plan: MemoryPlan) -> str:
    """A plan for people: the request, the peak, the breakdown at the peak, and the assumptions behind it."""
    request = plan.request
    method = request.method
    if method.method == "sara":
        how = f"SaRA, fraction {method.fraction:.4g}"
    else:
        how = f"LoRA r={method.rank}" if method.method == "lora" else "full fine-tuning"
    lines = [
        f"{request.model.name} ({request.model.class_name}), {how}, {request.resolution} px, "
        f"batch {request.batch_size}, {request.dtype}"
        + (", gradient checkpointing" if request.gradient_checkpointing else "")
        + (f", {request.base_quantization} base" if request.base_quantization else "")
        + f", {request.optimizer}",
        f"parameters {plan.parameters / 1e6:,.1f}M, trainable {plan.trainable_parameters / 1e6:,.2f}M",
        "",
        f"peak training memory: {gib(plan.peak_bytes)} GiB ({plan.peak_bytes:,} bytes)",
        "",
        f"{'part':<12} {'GiB':>8} {'share':>6}",
    ]
    for part in PARTS:
        share = plan.breakdown[part] / plan.peak_bytes if plan.peak_bytes else 0.0
        lines.append(f"{part:<12} {gib(plan.breakdown[part]):>8} {share:>6.1%}")
    lines += ["", "assumptions:"] + [f"- {line}" for line in plan.assumptions]
    lines.append(f"(planned in {plan.seconds:.1f} s)")
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as a Markdown table; ``columns`` are (key, heading) pairs."""
    lines = ["| " + " | ".join(heading for _, heading in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "")) for key, _ in columns) + " |")
    return "\n".join(lines)
