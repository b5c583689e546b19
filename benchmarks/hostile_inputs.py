"""Peak memory to refuse a hostile adapter file, as a multiple of the file's size (issue 28: bar <= 16x).

Each case runs in a fresh process (``ru_maxrss`` is a high-water mark): the process imports peft-sara, writes the
hostile file, records its peak RSS, then reads the file the way the library does until it is refused, and reports the
growth of the peak over the file's size. Cases:

- ``index-stream``: one layer whose 8 MiB varint stream holds 8M indices for 1 value (a load, ``inspect``, export);
- ``legacy-bin``: an ``adapter_model.bin`` whose deflate-compressed member expands to 400 MB;
- ``hub-legacy-bin``: the same file served by a Hub repo (the local Hub stub of the tests, ``tests/hub_stub.py``) and
  loaded with ``PeftModel.from_pretrained(model, repo_id)``, after a warm-up load of another (small) Hub repo so that
  imports and connections are not counted;
- ``export``: 200k stored entries claiming a 65536 x 65536 weight (a dense update of 16 GiB), exported as kohya
  without a base (before the bound, export built the claimed weight densely and started its SVD).

Run: ``python -m benchmarks.hostile_inputs`` (prints one JSON line per case; ``--case NAME`` runs one in-process).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

CASES = ("index-stream", "legacy-bin", "hub-legacy-bin", "export")
HUB_REPO, WARM_UP_REPO = "org/hostile-bin", "org/warm-up"
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"peft_type": "SARA", "trainable_fraction": 0.02, "target_modules": ["to_q"], "base_model_class": "UNet"}


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _layer(shape: tuple[int, ...], stream: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    try:
        from peft_sara.tuner.file_format import FORMAT_VERSION, entries_checksum, other_tensors_checksum
    except ImportError:  # peft-sara before the one reader
        from peft_sara.file_format import FORMAT_VERSION, entries_checksum, other_tensors_checksum

    tensors = {
        "sara_index_gaps": stream,
        "sara_values": values,
        "sara_weight_shape": torch.tensor(shape),
        "sara_layout": torch.tensor([0, 1, 0]),
    }
    tensors["sara_checksum"] = entries_checksum("to_q", tensors)
    layer = {f"to_q.{name}": tensor for name, tensor in tensors.items()}
    layer["sara_format_version"] = torch.tensor([FORMAT_VERSION])
    layer["sara_modules_to_save_checksum"] = other_tensors_checksum({}, None)
    return layer


def _write(case: str, folder: Path) -> Path:
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    if case == "index-stream":
        tensors = _layer((4096, 4096), torch.zeros(8 << 20, dtype=torch.uint8), torch.ones(1))
        save_file(tensors, folder / "adapter_model.safetensors")
        return folder / "adapter_model.safetensors"
    if case == "export":
        from peft_sara.adapter_files import read_adapter_weights  # noqa: F401  (the encoder is in the same module)

        try:
            from peft_sara.tuner.file_format import encode_index_gaps
        except ImportError:
            from peft_sara.index_encoding import encode_index_gaps
        indices = torch.arange(200_000, dtype=torch.int64) * 21_000
        tensors = _layer((65536, 65536), encode_index_gaps(indices), torch.ones(200_000))
        save_file(tensors, folder / "adapter_model.safetensors")
        return folder / "adapter_model.safetensors"
    plain = folder / "plain.bin"
    torch.save({"to_q.sara_values": torch.zeros(100 << 20)}, plain)  # 400 MB of zeros
    path = folder / "adapter_model.bin"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w") as target:
        for member in source.infolist():
            target.writestr(member.filename, source.read(member), compress_type=zipfile.ZIP_DEFLATED)
    plain.unlink()
    return path


class _ToQ(torch.nn.Module):
    """The smallest base the hostile config (``target_modules: ["to_q"]``) adapts."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(64, 64)


def _load_from_hub(repo: str) -> None:
    from peft import PeftModel

    PeftModel.from_pretrained(_ToQ(), repo)


def _refuse(case: str, folder: Path) -> str:
    from peft_sara.adapter_files import read_adapter_weights

    try:
        if case == "hub-legacy-bin":
            _load_from_hub(HUB_REPO)
        elif case == "export":
            from peft_sara.conversion import export_adapter, read_adapter_files

            export_adapter(read_adapter_files(folder, component="unet"), folder / "out.safetensors", "kohya")
        else:
            weights = read_adapter_weights(folder)
            try:
                from peft_sara.tuner.reader import check_checkpoint_file
            except ImportError:  # peft-sara before the one reader
                from peft_sara.checkpoint_checks import check_checkpoint_file
            check_checkpoint_file(weights)
    except Exception as err:  # the refusal being measured
        return f"{type(err).__name__}: {str(err)[:160]}"
    return "accepted"


def run_case(case: str) -> dict:
    import peft_sara.conversion  # noqa: F401  (imports first: their memory is not the file's)

    if case == "hub-legacy-bin":  # served by the parent's Hub stub (see main)
        if "SARA_HOSTILE_HUB_BYTES" not in os.environ:
            raise SystemExit("hub-legacy-bin runs from `python -m benchmarks.hostile_inputs`, which serves the file")
        with contextlib.suppress(Exception):  # a refusal too: imports, connections and caches are not the file's
            _load_from_hub(WARM_UP_REPO)
        size = int(os.environ["SARA_HOSTILE_HUB_BYTES"])
        before = _peak_bytes()
        outcome = _refuse(case, Path("."))
        growth = max(0, _peak_bytes() - before)
        return _result(case, size, growth, outcome)
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        # Written by another process: writing a 400 MB member would raise this process's high-water mark.
        subprocess.run([sys.executable, "-m", "benchmarks.hostile_inputs", "--write", case, directory], check=True)
        path = next(folder.glob("adapter_model.*"))
        size = path.stat().st_size
        before = _peak_bytes()
        outcome = _refuse(case, folder)
        growth = max(0, _peak_bytes() - before)
    return _result(case, size, growth, outcome)


def _result(case: str, size: int, growth: int, outcome: str) -> dict:
    return {
        "case": case,
        "file_bytes": size,
        "peak_growth_bytes": growth,
        "multiple_of_file": round(growth / size, 2),
        "outcome": outcome,
    }


def _run_hub_case(env: dict[str, str]) -> subprocess.CompletedProcess:
    """Serve the hostile legacy file from a Hub repo of the tests' Hub stub and measure its load in a fresh process."""
    import io

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from hub_stub import HubStub

    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        subprocess.run(
            [sys.executable, "-m", "benchmarks.hostile_inputs", "--write", "legacy-bin", directory], check=True
        )
        hostile = (folder / "adapter_model.bin").read_bytes()
        small = io.BytesIO()
        torch.save({"to_q.sara_values": torch.zeros(4)}, small)  # the warm-up repo: small, refused later
        config = json.dumps(CONFIG).encode()
        with HubStub(lifetime_s=600) as hub:
            for repo, weights in ((HUB_REPO, hostile), (WARM_UP_REPO, small.getvalue())):
                sha = hashlib.sha1(repo.encode()).hexdigest()
                hub.trees[sha] = {"adapter_config.json": config, "adapter_model.bin": weights}
                hub.branches[repo] = {"main": sha}
            hub_env = {key: value for key, value in env.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
            hub_env.update(
                HF_ENDPOINT=hub.url,
                HF_HUB_CACHE=str(folder / "cache"),
                HF_HUB_DISABLE_TELEMETRY="1",
                SARA_HOSTILE_HUB_BYTES=str(len(hostile)),
            )
            return subprocess.run(
                [sys.executable, "-m", "benchmarks.hostile_inputs", "--case", "hub-legacy-bin"],
                capture_output=True,
                text=True,
                env=hub_env,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--write", nargs=2, metavar=("CASE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        _write(args.write[0], Path(args.write[1]))
        return
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    for case in CASES:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if case == "hub-legacy-bin":
            result = _run_hub_case(env)
        else:
            result = subprocess.run(
                [sys.executable, "-m", "benchmarks.hostile_inputs", "--case", case],
                capture_output=True,
                text=True,
                env=env,
            )
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"case": case, "error": result.stderr[-400:]}))


if __name__ == "__main__":
    main()
