"""benchmarks.load with a subset of operations, and benchmarks.profile_load, run end to end on the small preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600


def run(*command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_load_benchmark_times_only_the_operations_asked_for(tmp_path):
    out = tmp_path / "load.json"
    run("benchmarks.load", "--preset", "small", "--repeats", "1", "--ops", "from_pretrained,hotswap", "--out", str(out))
    rows = {row["operation"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["get_peft_model", "save", "from_pretrained", "hotswap"]
    assert all(row["sara_s"] > 0 and row["lora_s"] > 0 for row in rows.values())


def test_profile_load_profiles_each_operation():
    output = run("benchmarks.profile_load", "--preset", "small", "--top", "60")
    for label in (
        "save_pretrained",
        "from_pretrained",
        "hotswap",
        "load_sara_adapter",
    ):
        assert f"## {label}: " in output
    assert "read_layer" in output
