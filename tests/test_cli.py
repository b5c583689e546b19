"""The ``peft-sara`` command line: every subcommand on tiny saved adapters and models, run in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

import peft_sara
from peft_sara import cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_pipelines  # noqa: E402
from hub_stub import HubStub  # noqa: E402
from tiny_pipelines import generate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def load_sd(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path)


def run(capsys, *argv: str) -> str:
    """Run ``peft-sara argv...`` in this process and return what it printed."""
    capsys.readouterr()
    assert cli.main([str(arg) for arg in argv]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny SD pipeline and a random SaRA adapter for it (unet + text_encoder), with the adapted images."""
    root = tmp_path_factory.mktemp("cli")
    pipeline_dir = tiny_pipelines.build_sd_pipeline(root)
    pipe = load_sd(pipeline_dir)
    tiny_pipelines.add_random_sara_adapter(pipe, "style")
    adapter_dir = peft_sara.save_sara_adapter(pipe, root / "adapter", base_model=str(pipeline_dir))
    return SimpleNamespace(root=root, pipeline_dir=pipeline_dir, adapter_dir=adapter_dir, adapted=generate(pipe))


def test_every_subcommand_answers_help(capsys):
    for name in cli.SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name
    listing = cli.build_parser().format_help()
    assert all(name in listing for name in ("inspect", "analyze", "export", "merge", "push", "demo"))


def test_inspect_reports_each_layer_the_totals_and_the_file_size(saved, capsys):
    report = json.loads(run(capsys, "inspect", saved.adapter_dir, "--json"))
    assert report["base_model"] == str(saved.pipeline_dir)
    components = {component["component"]: component for component in report["components"]}
    assert set(components) == {"unet", "text_encoder"}
    unet = components["unet"]
    assert unet["file_bytes"] == (saved.adapter_dir / "unet" / "adapter_model.safetensors").stat().st_size
    conv = next(row for row in unet["layers"] if row["module"] == "down_blocks.0.resnets.0.conv1")
    assert conv["weight_shape"] == [32, 32, 3, 3] and conv["frozen"] == 0
    assert conv["trainable"] == round(0.1 * 32 * 32 * 9) and conv["density"] == pytest.approx(0.1, abs=1e-3)
    assert conv["delta_norm"] > 0 and 1 < conv["effective_rank"] <= 32 and conv["rank"] <= 32
    totals = report["totals"]
    assert totals["trainable"] == sum(c["trainable"] for c in report["components"])
    assert totals["density"] == pytest.approx(0.1, abs=1e-3)
    table = run(capsys, "inspect", saved.adapter_dir, "--quiet", "--no-rank")
    assert "down_blocks.0.resnets.0.conv1" in table and "total: " in table and "KiB" in table


def test_export_writes_each_format_from_the_recorded_base_and_reports_the_error(saved, capsys):
    kohya = saved.root / "style-r4.safetensors"
    report = json.loads(
        run(capsys, "export", saved.adapter_dir, "--format", "kohya", "--rank", "4", "-o", kohya, "--json")
    )
    assert report["rank"] == 4 and 0 < report["total_relative_error"] < 1
    assert {row["rank"] for row in report["layers"]} == {4}
    assert any(key.startswith("lora_unet_") for key in load_file(kohya))
    out = run(capsys, "export", saved.adapter_dir, "--format", "peft-lora", "-o", saved.root / "peft", "--quiet")
    assert "full (exact): total relative error" in out
    assert (saved.root / "peft" / "unet" / "adapter_config.json").is_file()
    out = run(
        capsys,
        "export",
        saved.adapter_dir,
        "--base",
        saved.pipeline_dir,
        "--format",
        "diff",
        "--components",
        "unet",
        "--dtype",
        "float16",
        "-o",
        saved.root / "unet.diff.safetensors",
    )
    assert "exact dense differences" in out
    tensors = load_file(saved.root / "unet.diff.safetensors")
    assert all(key.startswith("lora_unet_") and key.endswith(".diff") for key in tensors)
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float16}


def test_merge_writes_a_pipeline_that_generates_the_adapted_images(saved, capsys):
    out = run(capsys, "merge", saved.pipeline_dir, saved.adapter_dir, "-o", saved.root / "merged")
    assert "merged model" in out
    np.testing.assert_allclose(generate(load_sd(saved.root / "merged")), saved.adapted, rtol=0, atol=2e-5)


def test_analyze_reports_small_weights_a_histogram_and_the_zeroing_test(saved, capsys):
    inputs = saved.root / "unet-inputs.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_file(
        {
            "sample": torch.randn(1, 4, 16, 16, generator=generator),
            "timestep": torch.tensor([10]),
            "encoder_hidden_states": torch.randn(1, 6, 32, generator=generator),
        },
        inputs,
    )
    histogram = saved.root / "weights.png"
    argv = ["analyze", saved.pipeline_dir, "--inputs", inputs, "--histogram", histogram, "--json"]
    report = json.loads(run(capsys, *argv, "--thresholds", "1e-3", "1e-2"))
    assert report["thresholds"] == [1e-3, 1e-2]
    assert 0 < report["fractions"]["0.001"] < report["fractions"]["0.01"] < 1
    assert len(report["layers"]) > 50 and histogram.read_bytes().startswith(b"\x89PNG")
    for row in report["zeroing"]:
        assert row["zeroed_weights"] > 0
        assert row["relative_change_small"] < row["relative_change_random"]  # the paper's observation
    table = run(capsys, "analyze", saved.pipeline_dir / "text_encoder", "--no-histogram", "--quiet")
    assert "encoder.layers.0.mlp.fc1" in table and "|w|<0.002" in table


def test_push_uploads_the_adapter_with_the_sara_card_and_inspect_reads_the_repo(saved, capsys, monkeypatch):
    import huggingface_hub.constants as hf_constants

    with HubStub(lifetime_s=300) as hub:
        out = run(
            capsys, "push", saved.adapter_dir, "org/cli-style", "--base-model", "org/tiny-sd", "--endpoint", hub.url
        )
        assert "org/cli-style" in out
        files = hub.files("org/cli-style")
        assert {"README.md", "unet/adapter_config.json", "unet/adapter_model.safetensors"} <= set(files)
        card = ModelCard(files["README.md"].decode())
        assert card.data.base_model == "org/tiny-sd" and card.data.base_model_relation == "adapter"
        assert {"sara", "peft-sara"} <= set(card.data.tags)
        assert 'load_sara_adapter(pipe, "org/cli-style")' in card.text

        # huggingface_hub reads HF_ENDPOINT at import time: point its constants at the stub
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(
            hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("HF_HUB_CACHE", str(saved.root / "hf-cache"))
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(saved.root / "hf-cache"))
        report = json.loads(run(capsys, "inspect", "org/cli-style", "--json", "--no-rank"))
    assert {component["component"] for component in report["components"]} == {"unet", "text_encoder"}


def test_command_line_errors_say_what_to_do(saved, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(saved.adapter_dir), "--format", "kohya", "--rank", "1.5", "-o", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "Invalid energy fraction 1.5" in capsys.readouterr().err
    moved = tmp_path / "moved-adapter"
    moved.mkdir()
    config = json.loads((saved.adapter_dir / "unet" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/not-downloaded"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(saved.adapter_dir / "unet" / "adapter_model.safetensors")
    save_file(weights, moved / "adapter_model.safetensors")  # no layout records: which component is unknown
    with pytest.raises(SystemExit, match="Pass --base"):
        cli.main(["export", str(moved), "--format", "diff", "-o", str(tmp_path / "x.safetensors")])


# ------------------------------------------------------------------------------------------------- hostile input
def folder_bytes(folder) -> dict:
    """Every file under ``folder`` with its bytes, to compare before / after a refused command."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def fail(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    status = cli.main([str(arg) for arg in argv])
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        lambda s, t: ["export", s.adapter_dir, "--format", "peft-lora", "-o", s.adapter_dir],  # the same folder
        lambda s, t: [
            "export",
            s.adapter_dir,
            "--format",
            "kohya",
            "-o",
            s.adapter_dir / "unet" / "adapter_model.safetensors",
        ],
        lambda s, t: [
            "export",
            s.adapter_dir / "unet",
            "--base",
            s.pipeline_dir / "unet",
            "--format",
            "diff",
            "-o",
            s.adapter_dir,
        ],
        lambda s, t: ["merge", s.pipeline_dir, s.adapter_dir, "-o", s.pipeline_dir],  # the base
        lambda s, t: ["merge", s.pipeline_dir, s.adapter_dir, "-o", s.pipeline_dir / "merged"],  # inside the base
    ],
    ids=[
        "export-onto-adapter",
        "export-into-weights-file",
        "export-containing-adapter",
        "merge-onto-base",
        "merge-inside-base",
    ],
)
def test_outputs_overlapping_an_input_are_refused_before_anything_is_written(saved, capsys, command):
    before = folder_bytes(saved.root)
    status, err = fail(capsys, *command(saved, None))
    assert status == 2 and "would destroy the input" in err and err.count("\n") == 1 and "Traceback" not in err
    assert folder_bytes(saved.root) == before


def corrupt_copy(saved, tmp_path, edit) -> str:
    folder = tmp_path / "hostile"
    folder.mkdir()
    source = saved.adapter_dir / "unet"
    (folder / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    tensors = load_file(source / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")
    return str(folder)


def _record_keys(tensors, name):
    return [key for key in tensors if key.endswith(name)]


def _set_shape(shape):
    def edit(tensors):
        for key in _record_keys(tensors, "sara_weight_shape"):
            tensors[key] = torch.tensor(shape, dtype=torch.int64)

    return edit


def _index_past_the_end(tensors):
    from peft_sara.index_encoding import decode_index_gaps, encode_index_gaps

    key = _record_keys(tensors, "sara_index_gaps")[0]
    indices = decode_index_gaps(tensors[key])
    indices[-1] = 10**9
    tensors[key] = encode_index_gaps(indices)


@pytest.mark.parametrize(
    "edit",
    [_set_shape([3000, 3000]), _set_shape([0, 0]), _set_shape([2**40, 2**40]), _index_past_the_end],
    ids=["huge-shape", "zero-shape", "4TB-shape", "index-past-end"],
)
def test_inspect_refuses_hostile_records_in_one_line_with_exit_status_2(saved, tmp_path, capsys, edit):
    folder = corrupt_copy(saved, tmp_path, edit)
    status, err = fail(capsys, "inspect", folder)
    assert status == 2 and err.startswith("peft-sara inspect: error:") and err.count("\n") == 1, err


def test_inspect_cost_is_bounded_by_the_entries_the_file_stores(saved, tmp_path, capsys):
    """A consistent file whose few entries claim a huge weight: statistics, but no dense SVD of that weight."""
    from peft_sara.export.adapter_stats import MAX_DENSE_PER_STORED_ENTRY, inspect_adapter
    from peft_sara.file_format import entries_checksum, split_sara_key

    def huge(tensors):
        layers = {}
        for key in tensors:
            split = split_sara_key(key)
            if split is not None and split[0]:
                layers.setdefault(split[0], {})[split[1]] = key
        for layer_name, keys in layers.items():
            tensors[keys["sara_weight_shape"]] = torch.tensor([3000, 3000], dtype=torch.int64)
            tensors[keys["sara_checksum"]] = entries_checksum(
                layer_name, {name: tensors[key] for name, key in keys.items() if name != "sara_checksum"}
            )

    report = inspect_adapter(corrupt_copy(saved, tmp_path, huge))
    rows = report["components"][0]["layers"]
    assert all(row["rank"] is None for row in rows if 9e6 > MAX_DENSE_PER_STORED_ENTRY * row["trainable"])


def test_errors_print_a_traceback_only_with_debug(saved, tmp_path, capsys):
    folder = corrupt_copy(saved, tmp_path, _index_past_the_end)
    status, err = fail(capsys, "inspect", folder)
    assert status == 2 and "Traceback" not in err
    with pytest.raises(ValueError, match="span|range"):
        cli.main(["--debug", "inspect", folder])


def test_help_and_version_import_no_subcommand_or_diffusers_module():
    import subprocess

    code = (
        "import sys; from peft_sara import cli; "
        "assert 'diffusers' not in sys.modules and 'peft_sara.commands.export_cmd' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------- fast and quiet
def test_the_help_texts_choices_are_the_librarys():
    """The subcommands write their choices out (so that `--help` imports nothing heavy): they must stay the same."""
    from peft_sara.commands import analyze_cmd, export_cmd, plan_cmd
    from peft_sara.conversion import DEFAULT_THRESHOLDS
    from peft_sara.demo import cli as demo_cli
    from peft_sara.demo.data import DATASETS, STYLES
    from peft_sara.demo.settings import DemoSettings
    from peft_sara.export.formats import DTYPES, FORMATS, MERGED
    from peft_sara.planning import DTYPES as PLAN_DTYPES
    from peft_sara.planning import METHODS, PRESETS
    from peft_sara.planning.analytic import OPTIMIZERS, QUANTIZATIONS

    assert analyze_cmd.DEFAULT_THRESHOLDS == tuple(DEFAULT_THRESHOLDS)
    assert export_cmd.EXPORT_FORMATS == tuple(name for name in FORMATS if name != MERGED)
    assert export_cmd.EXPORT_DTYPES == tuple(sorted(DTYPES))
    assert plan_cmd.PRESET_NAMES == tuple(PRESETS) and plan_cmd.METHODS == tuple(METHODS)
    assert plan_cmd.DTYPES == tuple(PLAN_DTYPES)
    assert plan_cmd.OPTIMIZERS == tuple(OPTIMIZERS) and plan_cmd.QUANTIZATIONS == tuple(QUANTIZATIONS)
    defaults = DemoSettings()
    assert demo_cli.DATASETS == tuple(DATASETS) and demo_cli.STYLES == tuple(sorted(STYLES))
    assert (demo_cli.DEFAULT_FINETUNE_STEPS, demo_cli.DEFAULT_PRETRAIN_STEPS) == (
        defaults.finetune_steps,
        defaults.pretrain_steps,
    )
    assert (demo_cli.DEFAULT_SEED, demo_cli.DEFAULT_STYLE) == (defaults.seed, defaults.style)
    assert demo_cli.DEFAULT_LEARNING_RATES == defaults.learning_rates


def test_import_noise_filter_drops_only_the_named_records_and_verbose_keeps_them(monkeypatch):
    import logging

    from peft_sara import quiet

    monkeypatch.setattr(quiet, "_kept", [])
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append((record.name, record.getMessage()))

    handler = Collect()
    names = ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops", "peft_sara.elsewhere")
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        quiet.drop_import_noise()
        quiet.drop_import_noise()  # idempotent: one filter per logger
        assert sum(isinstance(f, quiet._DropImportNoise) for f in loggers[0].filters) == 1
        loggers[0].warning("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library")
        loggers[1].warning("%s is an Enum subclass and is now natively supported by torch.compile", "<enum 'K'>")
        loggers[2].warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "untrusted")
        loggers[0].warning("torchao: something a user should see")  # same logger, another message
        loggers[3].warning("Failed to load CPU gemm_4bit_forward from kernels-community")  # another logger
        assert records == [
            ("torchao", "torchao: something a user should see"),
            ("peft_sara.elsewhere", "Failed to load CPU gemm_4bit_forward from kernels-community"),
        ]
        quiet.keep_import_noise()  # --verbose: everything again, and later drop calls do nothing
        quiet.drop_import_noise()
        loggers[0].warning("Failed to load /x/torchao/_C_mxfp8.so")
        assert records[-1] == ("torchao", "Failed to load /x/torchao/_C_mxfp8.so")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
            for item in [f for f in logger.filters if isinstance(f, quiet._DropImportNoise)]:
                logger.removeFilter(item)


def run_command(*argv: str, module: str = "peft_sara", cwd=None) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGV`` in a fresh interpreter (the import noise only shows at first import)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", module, *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


@pytest.mark.parametrize(
    "argv",
    [
        lambda s, t: ["--help"],
        lambda s, t: ["inspect", s.adapter_dir, "--quiet", "--no-rank"],
        lambda s, t: [
            "export",
            s.adapter_dir,
            "--format",
            "kohya",
            "--rank",
            "2",
            "-o",
            t / "k.safetensors",
            "--quiet",
        ],
        lambda s, t: ["merge", s.pipeline_dir, s.adapter_dir, "-o", t / "merged", "--quiet"],
        lambda s, t: ["plan", "--model", "tiny", "--method", "lora", "--resolution", "64", "--quiet"],
    ],
    ids=["help", "inspect", "export", "merge", "plan"],
)
def test_commands_print_nothing_but_their_own_output_with_the_optional_backends_installed(saved, tmp_path, argv):
    """torchao, bitsandbytes and optimum-quanto are installed here (the test extra): their import-time log lines
    must not reach the user; with --quiet the commands print nothing on stderr at all."""
    completed = run_command(*argv(saved, tmp_path))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stderr == ""
    assert completed.stdout.strip()


def test_plan_shows_its_progress_on_stderr_and_prints_every_methods_table(capsys):
    from peft_sara.commands import plan_cmd

    for method in ("sara", "lora", "full"):
        argv = ["--model", "tiny", "--method", method, "--resolution", "64", "--dtype", "float32"]
        assert plan_cmd.main(argv) == 0
        captured = capsys.readouterr()
        assert "peak training memory:" in captured.out and "weights" in captured.out, method
        expected = {"sara": "SaRA, fraction 0.05814", "lora": "LoRA r=16", "full": "full fine-tuning"}[method]
        assert expected in captured.out
        stages = [line for line in captured.err.splitlines() if line]
        assert stages and all(line.startswith("peft-sara plan: ") for line in stages), captured.err
        assert any("tracing one training step" in line for line in stages) and "done" in stages[-1]
