"""All-or-nothing changes to models: remember what a load may change, put it back exactly if the load fails.

A load (``PeftModel.from_pretrained`` / ``load_adapter``, ``peft_sara.load_sara_adapter``,
``peft_sara.training.load_training_state``) validates everything it reads before it changes the model; this module is
the second line: if something still fails after a change (an injection that trips over a module, a later component of
a pipeline), :meth:`ModelState.restore` puts back every module's attributes (children, parameter and buffer dicts,
active adapters, merged flags, ``peft_config``, tags, hooks), every parameter's ``requires_grad`` and ``grad``, and the
values of the tensors the caller named as about to be written. A tensor written in place that was not named is
detected (its version counter moved) and reported instead of silently left changed.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class RestoreError(RuntimeError):
    """A failed operation wrote into tensors that were not saved before it, so the model could not be restored."""


_CONTAINERS = (dict, OrderedDict, list, set)


def _contents(value: Any) -> Any:
    # Containers held by a module (children, parameters, buffers, hooks, per-adapter dicts, merged-adapter lists,
    # ``peft_config``, which PEFT shares between the tuner and the model) are remembered with their items, and restored
    # in place, so that every holder of the same container sees the restored items. Other types (diffusers' frozen
    # configs included) are kept by identity only.
    return value.copy() if type(value) in _CONTAINERS else None


def _restore_contents(value: Any, contents: Any) -> None:
    if isinstance(value, list):
        value[:] = contents
    else:
        value.clear()
        value.update(contents)


@dataclass
class _TensorState:
    tensor: torch.Tensor
    version: int
    requires_grad: bool
    grad: torch.Tensor | None
    values: torch.Tensor | None  # a copy, for tensors the operation is about to write


@dataclass
class ModelState:
    """The state of one or more models that an operation may change, captured by :meth:`capture`."""

    modules: list[tuple[nn.Module, dict[str, tuple[Any, Any]]]]
    tensors: list[_TensorState]

    @classmethod
    def capture(cls, *roots: nn.Module, copies: Iterable[torch.Tensor] = ()) -> ModelState:
        """Remember every module under ``roots`` and every parameter / buffer; copy the values of ``copies``."""
        modules, seen = [], set()
        for root in roots:
            for module in root.modules():
                if id(module) not in seen:
                    seen.add(id(module))
                    attributes = {key: (value, _contents(value)) for key, value in module.__dict__.items()}
                    modules.append((module, attributes))
        to_copy = {id(tensor) for tensor in copies}
        tensors, seen = [], set()
        for module, _ in modules:
            for tensor in list(module._parameters.values()) + list(module._buffers.values()):
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                values = tensor.detach().clone() if id(tensor) in to_copy else None
                grad = tensor.grad if isinstance(tensor, nn.Parameter) else None
                tensors.append(_TensorState(tensor, tensor._version, tensor.requires_grad, grad, values))
        return cls(modules, tensors)

    def keep_values(self, tensors: Iterable[torch.Tensor]) -> None:
        """Also put back the current values of ``tensors`` on :meth:`restore`: call it right before writing into them
        (e.g. merging into base weights). Tensors created after :meth:`capture` need not be kept: they go anyway."""
        wanted = {id(tensor) for tensor in tensors}
        for state in self.tensors:
            if id(state.tensor) in wanted and state.values is None and state.tensor._version == state.version:
                state.values = state.tensor.detach().clone()

    def restore(self) -> None:
        """Put every remembered module attribute, flag and copied value back; raise :class:`RestoreError` if a
        tensor that was not copied was written in place meanwhile."""
        for module, attributes in self.modules:
            module.__dict__.clear()
            module.__dict__.update({key: value for key, (value, _) in attributes.items()})
        for _, attributes in self.modules:
            for value, contents in attributes.values():
                if contents is not None:
                    _restore_contents(value, contents)
        written = []
        with torch.no_grad():
            for state in self.tensors:
                if state.values is not None:
                    if state.tensor.shape == state.values.shape:
                        state.tensor.copy_(state.values)
                    else:
                        state.tensor.data = state.values.clone()
                elif state.tensor._version != state.version:
                    written.append(tuple(state.tensor.shape))
                if state.tensor.is_leaf:
                    state.tensor.requires_grad_(state.requires_grad)
                if isinstance(state.tensor, nn.Parameter):
                    state.tensor.grad = state.grad
        if written:
            raise RestoreError(
                f"The failed operation wrote into {len(written)} tensors (shapes {written[:3]}) that were not saved "
                "before it: the model could not be restored exactly. Reload it."
            )


# Ids of the modules captured by the all_or_nothing blocks running in this context (see `covered`).
_covered: ContextVar[frozenset[int]] = ContextVar("peft_sara_covered_modules", default=frozenset())


def covered(module: nn.Module) -> bool:
    """Whether an enclosing :func:`all_or_nothing` in this context captured ``module`` (and everything under it): a
    step inside it that lets its errors through needs no capture of its own."""
    return id(module) in _covered.get()


@contextlib.contextmanager
def all_or_nothing(*roots: nn.Module, copies: Iterable[torch.Tensor] = ()) -> Iterator[ModelState]:
    """Run the body; if it raises, restore ``roots`` (see :meth:`ModelState.restore`) before the error propagates."""
    state = ModelState.capture(*roots, copies=copies)
    token = _covered.set(_covered.get() | {id(module) for module, _ in state.modules})
    try:
        yield state
    except BaseException as err:
        try:
            state.restore()
        except RestoreError as restore_error:
            raise restore_error from err
        raise
    finally:
        _covered.reset(token)


__all__ = ["ModelState", "RestoreError", "all_or_nothing", "covered"]
