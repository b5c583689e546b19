"""What the quality benchmarks share: settings, the per-process context (data, pretrained base, judge), one
fine-tuning job and a process pool that runs many, JSON and timing.

A *job* is one fine-tuning run: a method at a budget, a learning rate and a seed. It records the held-out losses at
each checkpoint (the training trajectory), and on request the judge's scores of samples drawn at the end and rank
statistics of the update. Jobs run in worker processes (one torch thread each); every worker gets the same
pretrained base and judge, so results do not depend on the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from peft_sara.demo.data import dataset_info
from peft_sara.demo.diffusion import build_noise_scheduler, sample_images
from peft_sara.demo.finetune import FinetuneHistory, finetune
from peft_sara.demo.judge import Judge, TrainedJudge, sample_scores
from peft_sara.demo.metrics import change_pct
from peft_sara.demo.records import DemoData, heldout_losses
from peft_sara.demo.run import prepare_data, pretrained_base, sample_judge
from peft_sara.demo.settings import DemoSettings, cache_key, default_cache_root

from .methods import BuiltMethod, build_method
from .rank import update_rank_report

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results" / "quality"
EVAL_SEED_OFFSET, SAMPLING_SEED_OFFSET = 1, 2  # as in the demo: the same noise for every model


@dataclass(frozen=True)
class QualitySettings:
    """The knobs of one benchmark run. :meth:`for_dataset` gives the full-size defaults, :meth:`tiny` a smoke test."""

    dataset: str = "digits"
    tiny: bool = False
    steps: int = 80
    batch_size: int = 16
    checkpoints: tuple[int, ...] = (10, 20, 40, 80)
    budgets: tuple[float, ...] = (0.02, 0.05, 0.10)  # trainable share of the targeted weights
    seeds: tuple[int, ...] = (0, 1, 2)
    # learning rates swept per method family (full fine-tuning moves every weight: a smaller range)
    sparse_learning_rates: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    lora_learning_rates: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    full_learning_rates: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    ablation_learning_rates: tuple[float, ...] = (3e-3,)  # the middle of the sparse sweep
    eval_draws: int = 1  # (noise, timestep) pairs per held-out image at each checkpoint
    samples_per_class: int = 10  # scored by the judge at the end of a run
    sample_steps: int = 20  # DDIM steps
    export_ranks: tuple[str, ...] = ("1", "2", "4", "8", "16", "0.9", "0.99", "full")

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any) -> QualitySettings:
        """Full-size settings on ``dataset`` (photo patches cost about twice as much per step: fewer seeds there)."""
        dataset_info(dataset)
        settings = cls(dataset=dataset)
        if dataset == "photo-patches":
            settings = replace(settings, seeds=(0, 1), samples_per_class=40)
        return replace(settings, **overrides)

    @classmethod
    def tiny_settings(cls, dataset: str = "digits") -> QualitySettings:
        """A smoke test: the demo's quick base model, a few steps, one seed, one learning rate per method."""
        return cls(
            dataset=dataset,
            tiny=True,
            steps=6,
            batch_size=8,
            checkpoints=(3, 6),
            budgets=(0.05,),
            seeds=(0,),
            sparse_learning_rates=(1e-2,),
            lora_learning_rates=(1e-2,),
            full_learning_rates=(1e-3,),
            ablation_learning_rates=(1e-2,),
            samples_per_class=3,
            sample_steps=4,
            export_ranks=("1", "full"),
        )

    def learning_rates(self, method: str) -> tuple[float, ...]:
        """The learning rates swept for ``method``."""
        if method == "full":
            return self.full_learning_rates
        if method.startswith("lora"):
            return self.lora_learning_rates
        return self.sparse_learning_rates

    def demo_settings(self) -> DemoSettings:
        """The demo settings whose base model, data split and style these benchmarks use."""
        return DemoSettings.quick(self.dataset) if self.tiny else DemoSettings.for_dataset(self.dataset)


@dataclass
class Context:
    """What every job of one process needs: data, the pretrained base, the judge and the base's reference numbers."""

    settings: QualitySettings
    demo: DemoSettings
    data: DemoData
    base: UNet2DModel
    judge: TrainedJudge
    base_losses: dict[str, float] = field(default_factory=dict)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out loss on the new style and on the untouched classes (same noise for every model)."""
        noise_scheduler = build_noise_scheduler()
        seed = self.demo.seed + EVAL_SEED_OFFSET
        return heldout_losses(model, self.data, noise_scheduler, self.settings.eval_draws, seed)

    def score_samples(self, model: torch.nn.Module) -> dict[str, float]:
        """Draw ``samples_per_class`` samples of every class and score them with the judge."""
        demo, per_class = self.demo, self.settings.samples_per_class
        groups = {"styled_classes": demo.styled_classes, "other_classes": demo.other_classes}
        labels = {group: torch.tensor(classes).repeat_interleave(per_class) for group, classes in groups.items()}
        scheduler, seed = build_noise_scheduler(), demo.seed + SAMPLING_SEED_OFFSET
        samples = {
            group: sample_images(model, scheduler, labels[group], self.settings.sample_steps, seed) for group in groups
        }
        references = {"styled_classes": self.data.heldout_styled, "other_classes": self.data.heldout_other}
        return sample_scores(self.judge, samples, labels, references)


def load_base_and_judge(settings: QualitySettings, cache_root: Path | None) -> tuple[DemoData, Any, TrainedJudge]:
    """The demo's data split, pretrained base (from the demo's cache, or trained and cached) and judge."""
    demo = settings.demo_settings()
    data = prepare_data(demo)
    cache_folder = (cache_root or default_cache_root()) / cache_key(demo)
    pretrained = pretrained_base(demo, data, cache_folder)
    return data, pretrained, sample_judge(demo, data)


def make_context(settings: QualitySettings, cache_root: Path | None = None) -> Context:
    """Build the context in this process (pretraining the base if the demo's cache does not hold it yet)."""
    data, pretrained, judge = load_base_and_judge(settings, cache_root)
    context = Context(settings, settings.demo_settings(), data, pretrained.unet.eval(), judge)
    context.base_losses = context.evaluate(context.base)
    return context


# ----------------------------------------------------------------------------------------------------- workers
_CONTEXT: Context | None = None


@dataclass(frozen=True)
class ContextPayload:
    """What a worker process needs to rebuild the main process's :class:`Context` without retraining anything."""

    settings: QualitySettings
    base_config: dict[str, Any]
    base_state: dict[str, torch.Tensor]
    judge_state: dict[str, torch.Tensor]
    judge_accuracy: float
    base_losses: dict[str, float]

    @classmethod
    def of(cls, context: Context) -> ContextPayload:
        return cls(
            context.settings,
            dict(context.base.config),
            {key: value.clone() for key, value in context.base.state_dict().items()},
            {key: value.clone() for key, value in context.judge.model.state_dict().items()},
            context.judge.heldout_accuracy,
            dict(context.base_losses),
        )

    def build(self) -> Context:
        demo = self.settings.demo_settings()
        base = UNet2DModel.from_config(self.base_config)
        base.load_state_dict(self.base_state)
        num_classes = dataset_info(demo.dataset).num_classes
        judge_model = Judge(demo.unet_config["in_channels"], 2 * num_classes)
        judge_model.load_state_dict(self.judge_state)
        judge = TrainedJudge(judge_model.eval(), num_classes, self.judge_accuracy)
        return Context(self.settings, demo, prepare_data(demo), base.eval(), judge, dict(self.base_losses))


def _init_worker(payload: ContextPayload) -> None:
    global _CONTEXT
    torch.set_num_threads(1)
    _CONTEXT = payload.build()


@dataclass(frozen=True)
class Job:
    """One fine-tuning run."""

    method: str
    budget: float
    learning_rate: float
    seed: int
    sample: bool = False  # score samples at the end
    rank_stats: bool = False  # nuclear norm / effective rank of the update, and the LoRA export error

    @property
    def name(self) -> str:
        return f"{self.method} budget={self.budget:g} lr={self.learning_rate:g} seed={self.seed}"


def run_job(job: Job, context: Context | None = None) -> dict[str, Any]:
    """Fine-tune the base with ``job``'s method and record its trajectory (and samples / rank statistics)."""
    context = context or _CONTEXT
    settings = context.settings
    wall, cpu = time.perf_counter(), time.process_time()
    built = build_method(job.method, context.base, job.budget, job.seed, context.demo.rank_min_dim)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse invariant checks")  # PEFT SHiRA's sparse tensors
        history = _train(built, job, context)
    result: dict[str, Any] = {
        **asdict(job),
        "trainable_params": built.trainable,
        "note": built.note,
        "checkpoints": [{"step": 0, **context.base_losses}]
        + [{"step": step, **losses} for step, losses in history.checkpoints],
        "final_train_loss": sum(history.losses[-10:]) / len(history.losses[-10:]),
        "trainable_after_reselection": history.trainable_after_reselection,
    }
    if job.sample:
        result["samples"] = context.score_samples(built.model)
    if job.rank_stats:
        result["rank"] = update_rank_report(built.model, settings.export_ranks)
    result["seconds"] = time.perf_counter() - wall
    result["cpu_seconds"] = time.process_time() - cpu
    return result


def _train(built: BuiltMethod, job: Job, context: Context) -> FinetuneHistory:
    settings = context.settings
    return finetune(
        built.model,
        build_noise_scheduler(),
        context.data.finetune_images,
        context.data.finetune_labels,
        steps=settings.steps,
        batch_size=settings.batch_size,
        learning_rate=job.learning_rate,
        seed=job.seed,
        description=job.name,
        use_sara_helper=built.use_sara_helper,
        evaluate=context.evaluate,
        checkpoint_steps=settings.checkpoints,
        progress_bar=False,
        evaluate_start=False,
    )


def run_jobs(
    context: Context, jobs: Sequence[Job], workers: int, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Run ``jobs`` on ``workers`` processes (in this process when ``workers`` is 1); results in ``jobs``' order."""
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    start = time.perf_counter()

    def record(position: int, result: dict[str, Any]) -> None:
        results[position] = result
        done = sum(item is not None for item in results)
        final = result["checkpoints"][-1]
        base = context.base_losses
        log(
            f"  [{done}/{len(jobs)} {time.perf_counter() - start:4.0f}s] {jobs[position].name}: new style "
            f"{change_pct(base['new_style'], final['new_style']):+.1f}%, other classes "
            f"{change_pct(base['other_classes'], final['other_classes']):+.1f}% ({result['cpu_seconds']:.0f} s CPU)"
        )

    if workers <= 1:
        torch.set_num_threads(1)
        for position, job in enumerate(jobs):
            record(position, run_job(job, context))
        return results  # type: ignore[return-value]
    payload = ContextPayload.of(context)
    order = sorted(range(len(jobs)), key=lambda position: -_job_cost(jobs[position]))  # longest first
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(payload,)) as pool:
        for position, result in pool.imap_unordered(_run_indexed, [(position, jobs[position]) for position in order]):
            record(position, result)
        pool.close()
        pool.join()
    return results  # type: ignore[return-value]


def _run_indexed(item: tuple[int, Job]) -> tuple[int, dict[str, Any]]:
    position, job = item
    return position, run_job(job)


def _job_cost(job: Job) -> float:
    return 1.0 + 0.3 * job.sample + 0.3 * job.rank_stats + 0.2 * (job.method == "full")


def describe_setup(context: Context) -> dict[str, Any]:
    """The setup every result file records: dataset, model, style, classes, data sizes, settings, machine."""
    demo, data = context.demo, context.data
    info = dataset_info(demo.dataset)
    return {
        "dataset": info.description,
        "style": demo.style,
        "styled_classes": [info.class_names[index] for index in demo.styled_classes],
        "other_classes": [info.class_names[index] for index in demo.other_classes],
        "finetune_images": len(data.finetune_labels),
        "heldout_styled_images": len(data.heldout_styled_labels),
        "heldout_other_images": len(data.heldout_other_labels),
        "base_parameters": sum(param.numel() for param in context.base.parameters()),
        "base_pretrain_steps": demo.pretrain_steps,
        "base_losses": context.base_losses,
        "judge_heldout_accuracy": context.judge.heldout_accuracy,
        "settings": asdict(context.settings),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def output_path(output_dir: Path, name: str, settings: QualitySettings, suffix: str) -> Path:
    """``<output_dir>/<name>_<dataset>.<suffix>``."""
    return output_dir / f"{name}_{settings.dataset}.{suffix}"
