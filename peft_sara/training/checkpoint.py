"""Checkpoints that resume SaRA training bitwise: adapter, optimizer, LR scheduler, helper and RNG states.

The training state is one safetensors file (``sara_training_state.safetensors``): its tensors, plus a JSON description
of everything else in the file's metadata. Reading it parses JSON and tensors only, never pickle, so a checkpoint
folder from someone else cannot run code. Only plain values are saved (None, bool, int, float, str, lists, tuples,
dicts, tensors, numpy arrays): anything else is refused when saving, with its path in the state.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import random
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors import safe_open
from torch import nn

from ..adapter_files import adapter_subfolder, read_adapter_weights, save_model_adapter
from ..atomic import folder_writer, recover_folder, save_safetensors_atomic
from ..checkpoint_checks import check_checkpoint_file
from ..constants import TRAINING_STATE_NAME
from ..file_format import InvalidAdapterError
from ..transaction import all_or_nothing
from ..tuner.selection import is_sharded
from .helper import SaRATrainingHelper, resolve_sara_adapter
from .optimizer import unwrap_optimizer

STATE_METADATA_KEY = "sara_training_state"
STATE_CHECKSUM_KEY = "sara_training_state_sha256"
STATE_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------- encoding
def encode_state(value: Any, tensors: dict[str, torch.Tensor], path: str = "state") -> Any:
    """``value`` as JSON-able data, its tensors and numpy arrays moved into ``tensors`` (referenced by key).

    Raises ``TypeError`` naming the path of a value that is not plain data (it could only be saved with pickle).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"ndarray": key}
    if isinstance(value, (list, tuple)):
        items = [encode_state(item, tensors, f"{path}[{i}]") for i, item in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else {"list": items}
    if isinstance(value, dict):
        return {
            "dict": [
                [encode_state(k, tensors, path), encode_state(v, tensors, f"{path}[{k!r}]")] for k, v in value.items()
            ]
        }
    raise TypeError(
        f"{path} is a {type(value).__name__}, which a training state can only hold as plain data (None, bool, int, "
        "float, str, lists, tuples, dicts, tensors, numpy arrays)."
    )


def decode_state(data: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The value :func:`encode_state` described; raises :class:`InvalidAdapterError` for anything it never writes."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, dict) and len(data) == 1:
        ((kind, payload),) = data.items()
        if kind in ("tensor", "ndarray") and isinstance(payload, str) and payload in tensors:
            return tensors[payload] if kind == "tensor" else tensors[payload].numpy()
        if kind in ("list", "tuple") and isinstance(payload, list):
            items = [decode_state(item, tensors, where) for item in payload]
            return tuple(items) if kind == "tuple" else items
        if kind == "dict" and isinstance(payload, list) and all(isinstance(p, list) and len(p) == 2 for p in payload):
            decoded = {}
            for key, value in payload:
                key = decode_state(key, tensors, where)
                if not isinstance(key, (bool, int, float, str, type(None))):
                    raise InvalidAdapterError(f"{where}: a dict key is a {type(key).__name__}, not a plain value.")
                decoded[key] = decode_state(value, tensors, where)
            return decoded
    raise InvalidAdapterError(f"{where} holds an entry this peft-sara never writes: {str(data)[:80]}")


def state_checksum(description: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a training state's JSON description and of every tensor (key, dtype, shape, bytes): integrity
    against accidents (truncation, bit flips, partial copies); anyone can recompute it, so it is no signature."""
    digest = hashlib.sha256(description.encode())
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def write_training_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a training state (plain data and tensors) as one safetensors file with its checksum, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    description = json.dumps({"version": STATE_FORMAT_VERSION, "state": encode_state(state, tensors)})
    metadata = {
        "format": "pt",
        STATE_METADATA_KEY: description,
        STATE_CHECKSUM_KEY: state_checksum(description, tensors),
    }
    save_safetensors_atomic(tensors, path, metadata=metadata)


def read_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read :func:`write_training_state`'s file, checking its form; no code in the file can run."""
    where = f"The training state '{path}'"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where} does not exist: the checkpoint is incomplete.")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if metadata.get(STATE_CHECKSUM_KEY) != state_checksum(metadata[STATE_METADATA_KEY], tensors):
            raise InvalidAdapterError(
                f"{where} does not match its checksum: the file is corrupted or was modified after saving."
            )
        description = json.loads(metadata[STATE_METADATA_KEY])
        if not isinstance(description, dict) or description.get("version") != STATE_FORMAT_VERSION:
            raise InvalidAdapterError(f"{where} has an unknown format: {str(description)[:80]}")
        state = decode_state(description.get("state"), tensors, where)
    except InvalidAdapterError:
        raise
    except (Exception, RecursionError) as err:  # safetensors', JSON's errors, missing metadata: not a training state
        raise InvalidAdapterError(
            f"{where} is not a readable SaRA training state (truncated or corrupted?): {err!r}"
        ) from err
    _check_state_layout(state, where)
    return state


def _check_state_layout(state: Any, where: str) -> None:
    def fail(what: str) -> None:
        raise InvalidAdapterError(f"{where}: {what}; the file is corrupted or was not written by save_training_state.")

    if not isinstance(state, dict) or not {"optimizer", "param_names", "lr_scheduler", "helper", "rng"} <= set(state):
        fail("it lacks the optimizer, parameter names, scheduler, helper or RNG entries")
    optimizer = state["optimizer"]
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict):
        fail("the optimizer state is not a dict with a `state` entry")
    groups = optimizer.get("param_groups")
    names = state["param_names"]
    if not isinstance(groups, list) or not isinstance(names, list) or len(groups) != len(names):
        fail("the optimizer's parameter groups and their parameter names do not correspond")
    for group, group_names in zip(groups, names):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            fail("an optimizer parameter group has no `params` list")
        if not isinstance(group_names, list) or not all(isinstance(n, str) for n in group_names):
            fail("the parameter names are not lists of strings")
        if len(group["params"]) != len(group_names):
            fail("a parameter group has another number of parameters than of names")
    for name in ("lr_scheduler", "helper"):
        if state[name] is not None and not isinstance(state[name], dict):
            fail(f"the {name} state is not a dict")
    rng = state["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        fail("the torch RNG state is missing or not a uint8 tensor")
    python_state = rng.get("python")
    if not (isinstance(python_state, tuple) and len(python_state) == 3 and isinstance(python_state[1], tuple)):
        fail("the Python RNG state is not random.getstate()'s tuple")
    _check_rng_states(rng, where)


# Per-parameter state of the optimizers whose resume is checked field by field: the fields they create, and whether
# every entry has all of them (SGD creates its momentum buffer only with momentum). Others get the shape checks.
_OPTIMIZER_FIELDS = {
    "Adam": (frozenset({"step", "exp_avg", "exp_avg_sq"}), True),
    "AdamW": (frozenset({"step", "exp_avg", "exp_avg_sq"}), True),
    "SGD": (frozenset({"momentum_buffer"}), False),
}


def _check_per_parameter_state(state: dict[str, Any], params: dict[str, nn.Parameter], optimizer: Any) -> None:
    """The saved optimizer state can be resumed by ``optimizer``: parameter references are the saved positions, every
    per-parameter tensor (Adam's moments, momentum buffers) has its parameter's shape and a floating dtype, step
    counters are non-negative scalars, and every parameter's state has the same fields (for torch's Adam, AdamW and SGD:
    the fields they create). Anything else would fail, or broadcast silently, at the first resumed step."""
    names = [name for group_names in state["param_names"] for name in group_names]
    saved = state["optimizer"]
    positions = [p for group in saved["param_groups"] for p in group["params"]]
    if positions != list(range(len(names))) or any(type(p) is not int for p in positions):
        raise InvalidAdapterError("The training state's optimizer refers to its parameters out of order or by bad ids.")
    expected, exact = _OPTIMIZER_FIELDS.get(type(optimizer).__name__, (None, False))
    if expected is not None and optimizer.defaults.get("amsgrad"):
        expected = expected | {"max_exp_avg_sq"}
    fields_seen = set()
    for key, entry in saved["state"].items():
        if type(key) is not int or not 0 <= key < len(names) or not isinstance(entry, dict):
            raise InvalidAdapterError(f"The training state's optimizer has state for an unknown parameter ({key!r}).")
        param, where = params[names[key]], f"The training state's optimizer state of '{names[key]}'"
        fields_seen.add(tuple(sorted(map(str, entry))))
        if expected is not None and not (set(entry) == expected if exact else set(entry) <= expected):
            raise InvalidAdapterError(
                f"{where} has fields {sorted(map(str, entry))}, {type(optimizer).__name__} {sorted(expected)}."
            )
        for field, value in entry.items():
            if field == "step":
                number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
                if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number < 2**53:
                    raise InvalidAdapterError(f"{where} has an invalid step {str(value)[:40]}.")
            elif not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.shape != param.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise InvalidAdapterError(
                    f"{where}: {field!r} is {shape}, the parameter {tuple(param.shape)}: the checkpoint does not belong "
                    "to this model and optimizer."
                )
    if len(fields_seen) > 1:
        raise InvalidAdapterError("The training state's optimizer state has different fields for different parameters.")


def _same_kind(saved: Any, current: Any, finite: bool = True) -> bool:
    """Whether a saved optimizer setting can stand where ``current`` stands: numbers for (with ``finite``, finite)
    numbers, tuples of numbers of the same length, and otherwise the same type (None stays None)."""
    if isinstance(current, bool) or current is None or isinstance(current, str):
        return type(saved) is type(current)
    if isinstance(current, (int, float)):
        number = isinstance(saved, (int, float)) and not isinstance(saved, bool)
        return number and (not finite or bool(np.isfinite(saved)))
    if isinstance(current, (tuple, list)):
        return (
            isinstance(saved, (tuple, list))
            and len(saved) == len(current)
            and all(_same_kind(a, b, finite) for a, b in zip(saved, current))
        )
    if isinstance(current, torch.Tensor):
        return isinstance(saved, torch.Tensor) and saved.shape == current.shape
    return type(saved) is type(current)


def _check_group_settings(saved_groups: list[dict], current_groups: list[dict]) -> None:
    """The saved parameter groups' settings (lr, betas, weight decay, ...) are those of this optimizer's kind, so that
    resuming cannot fail at the next step."""
    for index, (saved, current) in enumerate(zip(saved_groups, current_groups)):
        settings = set(current) - {"params"}
        if set(saved) - {"params"} != settings:
            raise InvalidAdapterError(
                f"Parameter group {index} of the training state's optimizer has settings "
                f"{sorted(map(str, set(saved) - {'params'}))}, this optimizer {sorted(settings)}: build the optimizer the same "
                "way as when the checkpoint was saved."
            )
        for key in sorted(settings):
            if not _same_kind(saved[key], current[key]):
                raise InvalidAdapterError(
                    f"Parameter group {index} of the training state's optimizer has {key}={str(saved[key])[:40]}, "
                    f"which cannot stand for this optimizer's {key}={current[key]!r}."
                )


def _needs_arguments(function: Any) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.default is inspect.Parameter.empty and p.kind in positional for p in parameters)


def _check_keys_and_kinds(saved: dict, current: dict, what: str, finite: bool = True) -> None:
    """``saved`` has exactly ``current``'s keys and each value is of the kind ``current``'s is (see :func:`_same_kind`):
    a key the object does not have would become an attribute (``step`` would shadow the method)."""
    if set(saved) != set(current):
        raise InvalidAdapterError(
            f"The training state's {what} state has keys {sorted(map(str, saved))}, this {what} "
            f"{sorted(map(str, current))}: build it the same way as when the checkpoint was saved."
        )
    for key in sorted(current):
        if not _same_kind(saved[key], current[key], finite):
            raise InvalidAdapterError(
                f"The training state's {what} state has {key}={str(saved[key])[:40]}, which cannot stand for this "
                f"{what}'s {key}={str(current[key])[:40]}."
            )


class _GroupsOnly:
    """What an LR scheduler touches of its optimizer: the parameter groups' settings (copies, without parameters)."""

    def __init__(self, groups: list[dict]) -> None:
        self.param_groups = [
            {**copy.deepcopy({k: v for k, v in group.items() if k != "params"}), "params": []} for group in groups
        ]
        self.defaults: dict = {}

    def step(self) -> None:  # pragma: no cover - schedulers only check that it exists
        pass


def _check_scheduler_state(saved: dict, scheduler: Any, optimizer: Any) -> None:
    """The saved scheduler state fits this scheduler (keys, kinds) and runs: loaded into a copy of it over copies of
    the parameter groups, which computes its learning rates and takes a step; anything it raises, or a non-finite
    learning rate, refuses the checkpoint before anything changed."""
    _check_keys_and_kinds(saved, scheduler.state_dict(), "LR scheduler", finite=False)
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps the torch one
    stand_in = _GroupsOnly(optimizer.param_groups)
    # Every reference to the optimizer (nested schedulers' included) becomes the stand-in: nothing real is touched.
    memo = {id(optimizer): stand_in, id(getattr(inner, "optimizer", optimizer)): stand_in}
    try:
        trial = copy.deepcopy(inner, memo)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial.load_state_dict(copy.deepcopy(saved))
            if not _needs_arguments(trial.step):  # ReduceLROnPlateau steps on a metric: loading is the trial
                trial.step()
            rates = [group["lr"] for group in stand_in.param_groups]
    except (Exception, RecursionError) as err:
        raise InvalidAdapterError(
            f"The training state's LR scheduler state cannot resume this {type(scheduler).__name__}: a trial step "
            f"on a copy raised {err!r}."
        ) from err
    bad = [rate for rate in rates if not isinstance(rate, (int, float, torch.Tensor)) or not np.isfinite(float(rate))]
    if bad:
        raise InvalidAdapterError(
            f"The training state's LR scheduler state gives this {type(scheduler).__name__} the learning rate "
            f"{bad[0]!r}."
        )


def _check_helper_state(saved: dict, helper: SaRATrainingHelper) -> None:
    """The saved helper state fits the helper: its keys, kinds, non-negative steps, a flag that is a bool, a generator
    state this helper's generator takes (tried on a throwaway one)."""
    _check_keys_and_kinds(saved, helper.state_dict(), "SaRA helper")
    for key in ("global_step", "progressive_step"):
        value = saved.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidAdapterError(f"The training state's SaRA helper has {key}={value!r}: not a step number.")
    if not isinstance(saved.get("reselected"), bool):
        raise InvalidAdapterError(
            f"The training state's SaRA helper has reselected={saved.get('reselected')!r}, not True or False."
        )
    try:
        torch.Generator(device=helper.generator.device).set_state(saved["generator"])
    except (Exception, RecursionError) as err:
        raise InvalidAdapterError(f"The training state's SaRA helper has an invalid generator state ({err}).") from err


def _check_rng_states(rng: dict[str, Any], where: str) -> None:
    """Apply the saved RNG states to throwaway generators first: a bad one is refused before anything changes."""
    try:
        torch.Generator().set_state(rng["torch"])
        random.Random().setstate(rng["python"])
        if rng.get("numpy") is not None:
            np.random.RandomState().set_state(rng["numpy"])
        if rng.get("cuda") is not None and not (
            isinstance(rng["cuda"], list) and all(isinstance(t, torch.Tensor) for t in rng["cuda"])
        ):
            raise TypeError("the CUDA RNG states are not a list of tensors")
    except (Exception, RecursionError) as err:
        raise InvalidAdapterError(f"{where}: a saved random-number-generator state is invalid ({err}).") from err


def _trainable_parameter_names(model: nn.Module) -> dict[nn.Parameter, str]:
    return {param: name for name, param in model.named_parameters() if param.requires_grad}


def save_training_state(
    output_dir: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any | None = None,
    helper: SaRATrainingHelper | None = None,
) -> None:
    """Save everything needed to resume bitwise: adapter, optimizer, scheduler, helper and RNG states.

    The adapter is written with ``save_pretrained`` (PEFT format, live entries only) into ``output_dir``; the rest
    goes to ``sara_training_state.safetensors`` beside it (no pickle). Both are published as one unit
    (``peft_sara.atomic.folder_writer``): a kill leaves the previous checkpoint or this one, never a mix. Optimizer
    state keeps the values Parameters' full (fixed) capacity, freed tail included, so that a resumed run continues
    bitwise.
    """
    sharded = [name for name, param in model.named_parameters() if "sara_" in name and is_sharded(param)]
    if sharded:
        raise ValueError(
            f"save_training_state writes from one process and cannot read sharded (FSDP2 / DTensor) SaRA parameters "
            f"such as '{sharded[0]}'. Checkpoint an FSDP run with torch.distributed.checkpoint (or accelerate's "
            "save_state) instead; see docs/DISTRIBUTED.md."
        )
    with folder_writer(output_dir) as staging:  # the adapter and its training state, published as one unit
        save_model_adapter(model, staging)
        _write_training_state_file(staging, model, optimizer, lr_scheduler, helper)


def _write_training_state_file(
    folder: os.PathLike, model: nn.Module, optimizer: Any, lr_scheduler: Any | None, helper: Any | None
) -> None:
    names = _trainable_parameter_names(model)
    inner = unwrap_optimizer(optimizer)
    state = {
        "optimizer": inner.state_dict(),
        "param_names": [[names[p] for p in group["params"]] for group in inner.param_groups],
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "helper": helper.state_dict() if helper is not None else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    state["rng"]["numpy"] = np.random.get_state()
    write_training_state(state, os.path.join(folder, TRAINING_STATE_NAME))


def _adapter_tensors(model: nn.Module, adapter_name: str) -> list[torch.Tensor]:
    """The tensors a load of ``adapter_name`` writes into: its SaRA entries and modules_to_save copies."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [
        tensor
        for name, tensor in named
        if adapter_name in name.split(".") and ("sara_" in name or ".modules_to_save." in f".{name}")
    ]


@contextmanager
def _resumable_states_restored_on_error(
    optimizer: torch.optim.Optimizer, lr_scheduler: Any | None, helper: SaRATrainingHelper | None
) -> Iterator[None]:
    """If the body raises, put the optimizer, scheduler, helper and RNG states back as they were before it."""
    # Keyed by the parameters themselves (identity), their state copied: a deepcopy of the whole dict would key the
    # restored state by copies of the parameters, which the optimizer never looks up again (its moments lost).
    saved_optimizer = {
        "state": defaultdict(dict, {param: copy.deepcopy(value) for param, value in optimizer.state.items()}),
        "param_groups": [
            {**copy.deepcopy({k: v for k, v in group.items() if k != "params"}), "params": list(group["params"])}
            for group in optimizer.param_groups
        ],
    }
    saved_scheduler = copy.deepcopy(lr_scheduler.state_dict()) if lr_scheduler is not None else None
    saved_helper = copy.deepcopy(helper.state_dict()) if helper is not None else None
    saved_rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        yield
    except BaseException:
        optimizer.__setstate__(saved_optimizer)
        if lr_scheduler is not None:
            lr_scheduler.load_state_dict(saved_scheduler)
        if helper is not None:
            helper.load_state_dict(saved_helper)
        torch.set_rng_state(saved_rng[0])
        random.setstate(saved_rng[1])
        np.random.set_state(saved_rng[2])
        raise


def load_training_state(
    input_dir: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any | None = None,
    helper: SaRATrainingHelper | None = None,
    adapter_name: str | None = None,
) -> None:
    """Resume from :func:`save_training_state`: loads the adapter into ``model`` (in place, into the values
    Parameters' capacity, so wrappers built before stay valid), points ``optimizer`` at the current parameters and
    restores all states.

    All or nothing: both files are read and checked first (the adapter as every SaRA load checks it, the training
    state's form, the optimizer's parameter groups against the model); if anything fails after that, the model,
    optimizer, scheduler, helper and RNG states are put back as they were before raising.
    """
    adapter_name, _ = resolve_sara_adapter(model, adapter_name)
    recover_folder(input_dir)  # a save killed while publishing: finish it first (peft_sara.atomic)
    adapter_dir = os.path.join(input_dir, adapter_subfolder(adapter_name))
    weights = read_adapter_weights(adapter_dir)
    check_checkpoint_file(weights)
    state = read_training_state(os.path.join(input_dir, TRAINING_STATE_NAME))
    params = dict(model.named_parameters())
    inner = unwrap_optimizer(optimizer)
    if len(state["param_names"]) != len(inner.param_groups):
        raise ValueError(
            f"The checkpoint's optimizer has {len(state['param_names'])} parameter groups, this one "
            f"{len(inner.param_groups)}: build the optimizer the same way as when the checkpoint was saved."
        )
    for index, (group, group_names) in enumerate(zip(inner.param_groups, state["param_names"])):
        unknown = [n for n in group_names if n not in params]
        if unknown:
            raise ValueError(f"Optimizer parameters {unknown[:3]} of the checkpoint are not in the model.")
        if len(group["params"]) != len(group_names):
            raise ValueError(
                f"Parameter group {index} of the checkpoint's optimizer has {len(group_names)} parameters, this "
                f"optimizer's {len(group['params'])}: build the optimizer the same way as when the checkpoint was saved."
            )

    # Checked before anything changes: what the scheduler and the helper would take, and run with.
    if lr_scheduler is not None and state["lr_scheduler"] is not None:
        _check_scheduler_state(state["lr_scheduler"], lr_scheduler, inner)
    if helper is not None and state["helper"] is not None:
        _check_helper_state(state["helper"], helper)

    with (
        all_or_nothing(model, copies=_adapter_tensors(model, adapter_name)),
        _resumable_states_restored_on_error(inner, lr_scheduler, helper),
    ):
        load_result = set_peft_model_state_dict(model, weights, adapter_name)
        missing = [k for k in getattr(load_result, "missing_keys", []) if "sara_" in k]
        if missing:
            raise ValueError(f"Checkpoint {input_dir} lacks SaRA tensors the model has: {missing[:5]}")
        params = dict(model.named_parameters())  # loading may have grown a values Parameter
        for group, group_names in zip(inner.param_groups, state["param_names"]):
            group["params"] = [params[name] for name in group_names]
        _check_per_parameter_state(state, params, inner)
        _check_group_settings(state["optimizer"]["param_groups"], inner.param_groups)
        inner.load_state_dict(state["optimizer"])
        if lr_scheduler is not None and state["lr_scheduler"] is not None:
            lr_scheduler.load_state_dict(state["lr_scheduler"])
        if helper is not None and state["helper"] is not None:
            helper.load_state_dict(state["helper"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if rng.get("numpy") is not None:
            np.random.set_state(rng["numpy"])


__all__ = [
    "save_training_state",
    "load_training_state",
    "write_training_state",
    "read_training_state",
    "TRAINING_STATE_NAME",
]
