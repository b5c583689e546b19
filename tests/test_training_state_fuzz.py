"""Fuzzing of training checkpoints (``sara_training_state.safetensors``): every damaged or hostile state loads equal to
the original or is refused with a clear error, runs no code, and leaves the model and optimizer exactly as they were.

Two families of inputs: damage a checksum catches (truncation, flipped bytes, edits without a new checksum) must be
refused; structural edits with a recomputed checksum (as a buggy writer would produce: JSON values of other types,
missing or extra entries, tensors of other dtypes or shapes) must be refused or load a state that trains, never crash.
``PEFT_SARA_FUZZ_EXAMPLES=1000`` runs more examples; the default run is derandomized, so CI sees the same inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import MLPConv, fuzz_settings
from peft import get_peft_model

from peft_sara import InvalidAdapterError, SaRAConfig
from peft_sara.constants import TRAINING_STATE_NAME
from peft_sara.training import load_training_state, save_training_state
from peft_sara.training.checkpoint import STATE_CHECKSUM_KEY, STATE_METADATA_KEY, state_checksum

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("PEFT_SARA_FUZZ_EXAMPLES", "120"))
TARGETS = ["conv", "lin0", "lin1"]
ALLOWED = (InvalidAdapterError, ValueError, FileNotFoundError)


def build():
    torch.manual_seed(0)
    model = get_peft_model(MLPConv(), SaRAConfig(target_modules=TARGETS, trainable_fraction=0.2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def train_step(model, optimizer, seed=0):
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def observe(model, optimizer):
    """Everything a load may change: every tensor of the model and of the optimizer's state, and the groups."""
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    for index, entry in enumerate(optimizer.state.values()):
        for field, value in entry.items():
            tensors[f"optim.{index}.{field}"] = value.clone() if isinstance(value, torch.Tensor) else value
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    names = {param: name for name, param in model.named_parameters()}
    return tensors, json.dumps(groups, default=str), [names.get(p) for g in optimizer.param_groups for p in g["params"]]


def differences(before, after):
    (tensors_a, groups_a, params_a), (tensors_b, groups_b, params_b) = before, after
    changed = [k for k in tensors_a.keys() | tensors_b.keys() if k not in tensors_a or k not in tensors_b]
    for key in tensors_a.keys() & tensors_b.keys():
        a, b = tensors_a[key], tensors_b[key]
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        else:
            same = a == b
        if not same:
            changed.append(key)
    return changed + (["param_groups"] if groups_a != groups_b or params_a != params_b else [])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("state") / "ckpt"
    model, optimizer = build()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.01)
    train_step(model, optimizer)
    save_training_state(str(folder), model, optimizer)
    reference_model, reference_optimizer = build()
    load_training_state(str(folder), reference_model, reference_optimizer)
    return folder, observe(reference_model, reference_optimizer)


def read_state(path):
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, json.loads(metadata[STATE_METADATA_KEY])


def write_state(path, tensors, description, sign=True):
    text = json.dumps(description)
    metadata = {"format": "pt", STATE_METADATA_KEY: text}
    if sign:
        metadata[STATE_CHECKSUM_KEY] = state_checksum(text, tensors)
    save_file(tensors, path, metadata=metadata)


def leaves(data, path=()):
    """Paths to every value in the JSON description (dicts by key, lists by position)."""
    yield path
    if isinstance(data, dict):
        for key, value in data.items():
            yield from leaves(value, (*path, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from leaves(value, (*path, index))


def replaced(data, path, value):
    if not path:
        return value
    data = json.loads(json.dumps(data))
    parent = data
    for step in path[:-1]:
        parent = parent[step]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return data


DELETE = object()
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(st.sampled_from(["tensor", "list", "dict", "tuple", "x"]), st.text(max_size=3), max_size=2),
    st.just(DELETE),
)
mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(min_value=0, max_value=0.999)),
    st.tuples(st.just("flip"), st.floats(min_value=0, max_value=0.999), st.integers(min_value=1, max_value=255)),
    st.tuples(st.just("edit_unsigned"), st.integers(min_value=0), JSON_VALUES),
    st.tuples(st.just("edit_signed"), st.integers(min_value=0), JSON_VALUES),
    st.tuples(
        st.just("tensor_signed"),
        st.integers(min_value=0),
        st.sampled_from(["dtype", "shape", "drop", "empty", "nan"]),
    ),
    st.tuples(st.just("pickle"), st.just(0)),
    st.tuples(st.just("resign"), st.just(0)),  # rewritten with nothing changed: loads equal
)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-training-state",))


def apply_mutation(mutation, path: Path) -> bool:
    """Damage the state file; returns whether a checksum can tell (the file is not re-signed)."""
    kind = mutation[0]
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: int(mutation[1] * len(data))])
        return True
    if kind == "flip":
        position = int(mutation[1] * len(data))
        path.write_bytes(data[:position] + bytes([data[position] ^ mutation[2]]) + data[position + 1 :])
        return True
    if kind == "pickle":
        import pickle

        path.write_bytes(pickle.dumps({"optimizer": RunsCode()}))
        return True
    tensors, description = read_state(path)
    if kind == "resign":
        write_state(path, tensors, description)
        return True
    if kind in ("edit_unsigned", "edit_signed"):
        paths = list(leaves(description))
        description = replaced(description, paths[mutation[1] % len(paths)], mutation[2])
        if description is DELETE:
            description = {}
        write_state(path, tensors, description, sign=kind == "edit_signed")
        return kind == "edit_unsigned"
    keys = sorted(tensors)
    key = keys[mutation[1] % len(keys)]
    change = mutation[2]
    if change == "dtype":
        tensors[key] = tensors[key].to(torch.float64 if tensors[key].dtype != torch.float64 else torch.int32)
    elif change == "shape":
        tensors[key] = torch.cat([tensors[key].reshape(-1), tensors[key].reshape(-1)[:1]])
    elif change == "drop":
        del tensors[key]
    elif change == "empty":
        tensors[key] = tensors[key].reshape(-1)[:0]
    else:
        tensors[key] = torch.full_like(tensors[key], float("nan")) if tensors[key].is_floating_point() else tensors[key]
    write_state(path, tensors, description)
    return False


def test_fuzzed_training_states_load_equal_or_fail_cleanly(checkpoint, one_thread, tmp_path, monkeypatch):
    source, reference = checkpoint
    monkeypatch.chdir(tmp_path)
    counts = Counter()
    failures = []

    @fuzz_settings(FUZZ_EXAMPLES)
    @given(mutation=mutations)
    def run(mutation):
        counts["hostile inputs tried"] += 1
        counts[f"mutation {mutation[0]}"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "ckpt"
            shutil.copytree(source, folder)
            detectable = apply_mutation(mutation, folder / TRAINING_STATE_NAME)
            model, optimizer = build()
            before = observe(model, optimizer)
            try:
                load_training_state(str(folder), model, optimizer)
            except ALLOWED as err:
                changed = differences(before, observe(model, optimizer))
                if changed:
                    counts["model changed by a failed load"] += 1
                    failures.append((mutation, f"{type(err).__name__}: {err}", changed[:5]))
                else:
                    counts[f"refused cleanly ({type(err).__name__})"] += 1
                return
            except Exception as err:  # noqa: BLE001 - any other type is a crash of the loader
                counts["crashes"] += 1
                failures.append((mutation, f"crash {type(err).__name__}: {err}", []))
                return
            mismatch = differences(reference, observe(model, optimizer))
            if not mismatch:
                counts["loaded equal to the original"] += 1
            elif detectable:
                counts["silent acceptances"] += 1
                failures.append((mutation, "loaded a damaged file without error", mismatch[:5]))
            else:
                try:  # a re-signed, well-formed edit: it must at least train
                    train_step(model, optimizer, seed=1)
                    counts["loaded a re-signed well-formed edit"] += 1
                except Exception as err:  # noqa: BLE001
                    counts["crashes"] += 1
                    failures.append((mutation, f"accepted, then the step crashed: {type(err).__name__}: {err}", []))

    run()
    for name in ("crashes", "silent acceptances", "model changed by a failed load"):
        counts.setdefault(name, 0)
    print("\nhostile training states:", json.dumps(dict(sorted(counts.items())), indent=1))
    assert not (tmp_path / "pwned-by-training-state").exists()
    assert not failures, "\n".join(map(str, failures[:10]))
    assert counts["hostile inputs tried"] >= min(FUZZ_EXAMPLES, 100)
    assert counts["loaded equal to the original"] > 0 and sum(v for k, v in counts.items() if "refused" in k) > 0
