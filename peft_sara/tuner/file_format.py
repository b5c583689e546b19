"""The SaRA adapter file format: what ``adapter_model.safetensors`` holds, how it is encoded, and its one key parser.

This docstring is the one description of the format (README's "File format and sizes" and docs/RELIABILITY.md point
here). There is one format, version :data:`FORMAT_VERSION`; a file of a version this release does not read is refused.

An adapter folder is PEFT's: ``adapter_config.json`` (a ``SaRAConfig``) and ``adapter_model.safetensors``. Tensor keys
are module paths, with PEFT's ``base_model.model.`` prefix when saved from a ``PeftModel`` (either spelling loads into
either kind of model) and without the adapter name. Per SaRA layer ``<layer>``:

==================================  ========================  ==========================================================
key                                 dtype, shape              holds
==================================  ========================  ==========================================================
``<layer>.sara_index_gaps``         uint8 ``[bytes]``         the trainable entries' flat indices into the base weight,
                                                              ascending, as varint gaps (``peft_sara.tuner.file_format``):
                                                              about 1 byte per entry at SaRA's densities
``<layer>.sara_values``             float32 / float16 /       one value per index, in index order; the dtype is
                                    bfloat16 ``[n]``          ``SaRAConfig.save_dtype`` (default float32)
``<layer>.sara_frozen_index_gaps``  as above                  entries frozen by progressive re-selection (absent when
``<layer>.sara_frozen_values``                                there are none)
``<layer>.sara_weight_shape``       int64 ``[ndim]``          the shape of the base weight the indices address
``<layer>.sara_layout``             int64 ``[3 + spatial]``   how the weight is used beyond its shape: kind (linear,
                                                              linear stored in x out as transformers' ``Conv1D``,
                                                              convolution), groups, padding mode, dilations
                                                              (:class:`LayerLayout`)
``<layer>.sara_checksum``           uint8 ``[32]``            SHA-256 of the layer's name and the tensors above (name,
                                                              dtype, shape and bytes of each)
==================================  ========================  ==========================================================

Per file: ``sara_format_version`` (int64 ``[1]``), ``sara_modules_to_save_checksum`` (uint8 ``[32]``, the SHA-256
of every other tensor, by saved name) and, from format 3, ``sara_config_fingerprint`` (uint8 ``[32]``): the
``SaRAConfig.settings_fingerprint()`` of the config saved with it, which ``adapter_config.json`` holds as
``config_fingerprint``. PEFT's ``save_pretrained`` writes the weights, then the config, each in place: a save killed
between the two leaves new weights beside the old config, and the readers refuse a pair whose fingerprints differ (or
a fingerprinted file beside a config without one); files without the record (formats 1 and 2) load as before. Every
other tensor is a module of the config's ``modules_to_save``.
``adapter_config.json`` is the ``SaRAConfig``; ``base_model_class`` there names the class of the model the adapter was
injected into (filled at injection), which tells exporters which pipeline component it adapts.

So the files are exactly what PEFT saves: ``PeftModel.save_pretrained``, ``peft_sara.save_sara_adapter`` and the Hub
push write the same tensors (keys spelt with or without PEFT's ``base_model.model.``) and the same config, with no
safetensors metadata of their own. Format 1 (peft-sara up to dc2a78b) had no ``sara_layout`` and kept the layouts and
model class in safetensors metadata (``peft_sara_layouts``, ``peft_sara_model_class``) that only peft-sara's own
writers added; it still loads, and its metadata is read (and checked against the shapes) by exports.

Encoding happens at the file's edge: layers keep int32 / int64 indices in memory. SaRA's tuner encodes in its state-dict
hook (``SaRAModel._get_adapter_state_dict``, which every save runs, PEFT's included): empty frozen sets are dropped,
values are cast to ``save_dtype``, each set is sorted by index (values with it) and its indices written as gaps, and the
records are added. Every reader decodes in one place (``peft_sara.tuner.reader.read_layer``), once per load, before
anything reaches ``load_state_dict``: PEFT's ``from_pretrained`` / ``load_adapter`` through the
tuner's load hook (``SaRAModel._remap_adapter_state_dict_for_load``), ``load_sara_adapter``, hotswap, training resume,
``peft-sara inspect`` / ``export`` and ``read_adapter_files``. What each check covers is in
``peft_sara.tuner.reader``.

Size per stored entry: ~1 byte of index (a gap below 128) + 4 bytes of float32 value, or 2 with ``save_dtype="float16"``
or ``"bfloat16"``: about 5 / 3 bytes, against 8 for an int32 index beside a float32 value (``benchmarks/file_size.py``).
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import nn

FORMAT_VERSION = 3
# 1: layouts and model class in safetensors metadata (peft-sara <= 0.1 at dc2a78b); 2: no config fingerprint.
READABLE_VERSIONS = (1, 2, 3)
FORMAT_VERSION_NAME = "sara_format_version"
# One per file: the checksum of every tensor that is not a SaRA entry (modules_to_save), by saved name.
OTHER_CHECKSUM_NAME = "sara_modules_to_save_checksum"
# One per file (format 3): the settings fingerprint of the config saved with the weights (see the docstring).
CONFIG_FINGERPRINT_NAME = "sara_config_fingerprint"
FILE_RECORD_NAMES = (FORMAT_VERSION_NAME, OTHER_CHECKSUM_NAME, CONFIG_FINGERPRINT_NAME)
WEIGHT_SHAPE_NAME = "sara_weight_shape"
LAYOUT_NAME = "sara_layout"
CHECKSUM_NAME = "sara_checksum"
# A layer's entries as the file stores them, and as the layer holds them (in memory, in a model's state dict).
STORED_ENTRY_NAMES = ("sara_index_gaps", "sara_values", "sara_frozen_index_gaps", "sara_frozen_values")
LAYER_ENTRY_NAMES = ("sara_indices", "sara_values", "sara_frozen_indices", "sara_frozen_values")
STORED_INDEX_NAME = {"sara_indices": "sara_index_gaps", "sara_frozen_indices": "sara_frozen_index_gaps"}
RECORD_NAMES = (WEIGHT_SHAPE_NAME, CHECKSUM_NAME)
CHECKSUMMED_NAMES = STORED_ENTRY_NAMES + (WEIGHT_SHAPE_NAME, LAYOUT_NAME)
LAYER_TENSOR_NAMES = tuple(dict.fromkeys(STORED_ENTRY_NAMES + LAYER_ENTRY_NAMES + RECORD_NAMES + (LAYOUT_NAME,)))
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CHECKSUM_BYTES = 32
PEFT_MODEL_PREFIX = "base_model.model."


class InvalidAdapterError(ValueError):
    """An adapter (file, config or state dict) that cannot be loaded as it is: malformed, corrupted, or made for
    another model. Raised before anything of the model changes."""


# ------------------------------------------------------------------------------------------------- index encoding
# Lossless coding of a layer's flat indices in adapter files: ascending gaps as a varint byte stream.
#
# A selection is a set of flat indices into the weight, ascending in memory. A file stores the first index and then the
# difference of each index to the one before (the *gaps*), each written as an unsigned LEB128 varint: seven bits per
# byte, low bits first, the high bit set on every byte but a number's last. A gap below 128 takes one byte, below 16,384
# two. At a density ``d`` the gaps average ``1 / d`` (50 at 2%, 17 at 6%), so an entry costs about one byte of index
# instead of the four of an int32. A gap of 0 means a repeated index: it can be written, and the loaders refuse it.
#
# Decoding is vectorised (a handful of passes over the bytes, no Python loop per entry) and refuses any stream that is
# not the encoding of a non-decreasing sequence of int64 indices: a number cut off at the end, a number longer than
# nine bytes (63 bits), or gaps whose running sum overflows.
MAX_VARINT_BYTES = 9  # 9 x 7 = 63 bits: every non-negative int64
ONE_BYTE = 0x80  # numbers below it take one byte; a byte at or above it is followed by more of its number


def _flat_indices(indices: torch.Tensor) -> numpy.ndarray:
    """Flat indices as a CPU array, int32 kept as it is (a layer's usual index dtype: half the bytes to pass over)."""
    flat = indices.detach().reshape(-1).cpu()
    return (flat if flat.dtype in (torch.int32, torch.int64) else flat.to(torch.int64)).numpy()


def _ascending_gaps(flat: numpy.ndarray) -> numpy.ndarray | None:
    """The gaps (in the indices' dtype) of flat indices, first index first; None unless they are ascending and
    non-negative (then no difference wraps)."""
    gaps = flat.copy()
    numpy.subtract(flat[1:], flat[:-1], out=gaps[1:])
    if int(flat.min()) < 0 or int(gaps.min()) < 0:
        return None
    return gaps


def _gaps_stream(gaps: numpy.ndarray) -> torch.Tensor:
    """The varint stream of non-negative integer gaps (int32 or int64). Gaps below 128 (nearly all, at SaRA's densities) are copied as
    bytes in one masked pass; the few longer numbers are written byte by byte, at positions shifted by the extra bytes
    of the longer numbers before them."""
    largest = int(gaps.max()) if gaps.size else 0
    if largest < ONE_BYTE:
        return torch.from_numpy(gaps.astype(numpy.uint8))
    if largest < 1 << 14:
        return _short_gaps_stream(gaps)
    short = gaps < ONE_BYTE
    longer = numpy.flatnonzero(~short)
    values = gaps[longer].astype(numpy.int64)
    lengths = numpy.ones_like(values)
    for extra in range(1, MAX_VARINT_BYTES):
        lengths += values >= (1 << (7 * extra))
    extra_bytes = lengths - 1
    starts = longer + numpy.cumsum(extra_bytes) - extra_bytes  # each longer number's first byte in the stream
    stream = numpy.empty(gaps.size + int(extra_bytes.sum()), dtype=numpy.uint8)
    owned = numpy.zeros(stream.size, dtype=bool)  # bytes of the longer numbers
    for position in range(int(lengths.max())):
        has = lengths > position
        at = starts[has] + position
        byte = (values[has] >> (7 * position)) & 0x7F
        byte |= (extra_bytes[has] > position).astype(numpy.int64) << 7  # continuation bit on all but the last byte
        stream[at] = byte
        owned[at] = True
    stream[~owned] = gaps[short]
    return torch.from_numpy(stream)


def _short_gaps_stream(gaps: numpy.ndarray) -> torch.Tensor:
    """The varint stream of gaps below 16,384 (one or two bytes each: nearly every layer's): each gap's two bytes
    side by side (its low 7 bits, with the continuation bit when a second byte follows; its high bits), then the
    second bytes of the one-byte numbers dropped."""
    two_bytes = gaps >= ONE_BYTE
    pairs = numpy.empty((gaps.size, 2), dtype=numpy.uint8)
    numpy.bitwise_and(gaps, 0x7F, out=pairs[:, 0], casting="unsafe")
    pairs[:, 0] |= two_bytes.view(numpy.uint8) << 7
    numpy.right_shift(gaps, 7, out=pairs[:, 1], casting="unsafe")
    keep = numpy.empty((gaps.size, 2), dtype=bool)
    keep[:, 0] = True
    keep[:, 1] = two_bytes
    return torch.from_numpy(numpy.compress(keep.reshape(-1), pairs.reshape(-1)))


def encode_index_gaps(indices: torch.Tensor) -> torch.Tensor:
    """The varint gap stream (1-D uint8) of ascending (non-decreasing) non-negative flat indices.

    Raises ``ValueError`` if the indices are negative or not ascending: sort the entries first (with their values).
    """
    flat = _flat_indices(indices)
    if flat.size == 0:
        return torch.zeros(0, dtype=torch.uint8)
    gaps = _ascending_gaps(flat)
    if gaps is None:
        raise ValueError("Only ascending, non-negative indices can be written as gaps: sort the entries first.")
    return _gaps_stream(gaps)


def encode_entries(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gap stream of an entry set and its values in index order: sorted (values with their indices) only when the
    indices are not ascending already (layers keep them ascending until a re-selection or an update reorders them).
    Raises ``ValueError`` on negative indices."""
    flat = _flat_indices(indices)
    if flat.size == 0:
        return torch.zeros(0, dtype=torch.uint8), values
    gaps = _ascending_gaps(flat)
    if gaps is None:
        order = torch.from_numpy(numpy.argsort(flat, kind="stable"))
        return encode_index_gaps(torch.from_numpy(flat)[order]), values[order.to(values.device)]
    return _gaps_stream(gaps), values


DECODE_CHUNK_BYTES = 1 << 20  # decoded piece by piece: the work memory is a few tens of MB whatever the stream


def _check_stream(stream: torch.Tensor) -> None:
    if stream.dtype != torch.uint8 or stream.dim() != 1:
        raise ValueError(
            f"index gaps must be a 1-D uint8 byte stream, got dtype {stream.dtype} and shape {tuple(stream.shape)}"
        )


def count_index_gaps(stream: torch.Tensor) -> int:
    """How many numbers a varint gap stream holds (its last bytes), without decoding it; checks its form."""
    _check_stream(stream)
    return int(numpy.count_nonzero(stream.detach().cpu().numpy() < ONE_BYTE))


def _piece_gaps(piece: numpy.ndarray, ends: numpy.ndarray) -> tuple[numpy.ndarray, int]:
    """The gaps of a stream piece that ends with a number's last byte (``ends`` flags those bytes), and the length in
    bytes of its longest number: int32 when no number is longer than two bytes (gaps below 16,384), else int64. A
    one-byte number is its byte; the few longer ones (a gap of 128 or more) are completed from their other bytes, each
    at its place value."""
    longer = numpy.flatnonzero(~ends)  # bytes followed by more of their number (few)
    if longer.size == 0:
        return piece.astype(numpy.int32), 1
    # The number each such byte belongs to: as many numbers end before it as bytes before it are last bytes.
    counter = numpy.arange(longer.size)
    number = longer - counter
    if longer.size < 2 or bool((longer[1:] - longer[:-1] > 1).all()):  # two-byte numbers only (gaps below 16,384)
        gaps = piece[ends].astype(numpy.int32)
        gaps[number] = (gaps[number] << 7) + piece[longer] - ONE_BYTE
        return gaps, 2
    gaps = piece[ends].astype(numpy.int64)
    # Consecutive such bytes belong to one number: each one's place in it.
    starts_run = numpy.ones(longer.size, dtype=bool)
    starts_run[1:] = longer[1:] != longer[:-1] + 1
    place = counter - numpy.maximum.accumulate(numpy.where(starts_run, counter, 0))
    longest = int(place.max()) + 2
    if longest > MAX_VARINT_BYTES:
        raise ValueError(f"an index gap is longer than {MAX_VARINT_BYTES} bytes (more than 63 bits)")
    low = (piece[longer].astype(numpy.int64) - ONE_BYTE) << (7 * place)
    ends_run = numpy.ones_like(starts_run)
    ends_run[:-1] = starts_run[1:]
    # A number's gap: its last byte at the place after its other bytes, plus their sum (a run's total of `low`).
    totals = numpy.cumsum(low)
    run_sums = totals[ends_run] - numpy.concatenate(([0], totals[ends_run][:-1]))
    last = number[ends_run]
    gaps[last] = (gaps[last] << (7 * (place[ends_run] + 1))) + run_sums
    return gaps, longest


def _short_piece_indices(
    piece: numpy.ndarray, ends: numpy.ndarray, last: int, limit: int | None, out: torch.Tensor
) -> bool:
    """The indices of a stream piece whose numbers are one or two bytes long (gaps below 16,384: nearly every stream),
    written to ``out`` after ``last``, in three passes: each byte's share of its index (a one-byte number's byte, a
    first byte's low 7 bits, a second byte shifted by 7), their running sum, and the sums at the numbers' last bytes.
    False (nothing written) for a piece with a longer number, or whose sums could pass ``out``'s dtype; raises
    ``ValueError`` on an index at or past ``limit``."""
    more = ~ends  # bytes followed by more of their number
    if piece.size > 1 and bool((more[1:] & more[:-1]).any()):  # a number of three bytes or more
        return False
    dtype = numpy.int32 if out.dtype == torch.int32 else numpy.int64
    shares = numpy.bitwise_and(piece, 0x7F).astype(dtype)
    if piece.size > 1:  # a piece starts with a number's first byte: only later bytes can be second bytes
        numpy.left_shift(shares[1:], more[:-1].view(numpy.uint8) * numpy.uint8(7), out=shares[1:])
    largest = last + int(shares.sum(dtype=numpy.int64))  # the piece's last index (the shares are non-negative)
    if limit is not None and largest >= limit:
        raise ValueError(f"an index ({largest}) is out of range: the weight has {limit} entries")
    if largest > numpy.iinfo(dtype).max:
        return False
    shares[0] += last
    sums = torch.from_numpy(shares).cumsum_(0).numpy()
    numpy.compress(ends, sums, out=out.numpy())
    return True


def decode_index_gaps(
    stream: torch.Tensor, dtype: torch.dtype = torch.int64, count: int | None = None, limit: int | None = None
) -> torch.Tensor:
    """The flat indices (1-D, ``dtype``) a varint gap stream encodes; the inverse of :func:`encode_index_gaps`.

    ``count``: the number of indices expected (one per value), compared before the result is allocated; ``limit``:
    every index must be below it (the weight's size), checked piece by piece. The stream is decoded in pieces of
    :data:`DECODE_CHUNK_BYTES`, so the memory used beyond the result and a flag per byte is bounded. Each piece is a
    few passes over its bytes (its gaps, then their running sum); only the numbers longer than a byte are completed
    one by one, in a vectorised pass over them.

    Raises ``ValueError`` on a stream that is not a 1-D uint8 tensor or not a valid encoding (see above), or that does
    not hold ``count`` indices below ``limit``.
    """
    _check_stream(stream)
    data = stream.detach().cpu().numpy()
    ends = data < ONE_BYTE  # each number's last byte
    found = int(numpy.count_nonzero(ends))
    if count is not None and found != count:
        raise ValueError(f"the index gap stream holds {found} indices but {count} values")
    size = data.size
    if size and not ends[-1]:
        raise ValueError("the index gap stream ends inside a number (truncated)")
    fits = limit is not None and limit - 1 <= torch.iinfo(dtype).max
    result = torch.empty(found, dtype=dtype if fits else torch.int64)
    position, written, last = 0, 0, 0
    while position < size:
        end = min(position + max(DECODE_CHUNK_BYTES, MAX_VARINT_BYTES), size)
        if end < size:  # cut after the piece's last complete number
            start = end - MAX_VARINT_BYTES  # a valid stream has a number's last byte among any 9 in a row
            tail = numpy.flatnonzero(ends[start:end])
            if tail.size == 0:  # an invalid one: its piece ends where it can (the long number is refused after it)
                start, tail = position, numpy.flatnonzero(ends[position:end])
            if tail.size == 0:
                raise ValueError(f"an index gap is longer than {MAX_VARINT_BYTES} bytes (more than 63 bits)")
            end = start + int(tail[-1]) + 1
        out_end = written + int(numpy.count_nonzero(ends[position:end]))
        if _short_piece_indices(data[position:end], ends[position:end], last, limit, result[written:out_end]):
            last, written, position = int(result[out_end - 1]), out_end, end
            continue
        gaps, longest = _piece_gaps(data[position:end], ends[position:end])
        out = result[written : written + gaps.size]
        if last + gaps.size * (1 << (7 * longest)) <= 2**63 - 1:  # no running sum can pass the int64 range
            largest = last + int(gaps.sum())  # the piece's last index (ascending); numpy sums int32 in int64
            if limit is not None and largest >= limit:
                raise ValueError(f"an index ({largest}) is out of range: the weight has {limit} entries")
            # Below the limit, so below the result dtype's largest value: the running sum is taken in that dtype.
            torch.cumsum(torch.from_numpy(gaps), 0, dtype=out.dtype, out=out)
            if last:
                out += last
        else:
            # Gaps are non-negative and below 2**63: a running sum can only go wrong by passing the int64 range, and
            # one that does so goes down (in torch: a sum past int64 wraps silently).
            indices = torch.from_numpy(gaps.astype(numpy.int64, copy=False))
            indices[0] += last  # (in torch, which wraps without a warning; a wrap is refused below)
            indices.cumsum_(0)
            if int(indices[0]) < last or not bool((indices[1:] >= indices[:-1]).all()):
                raise ValueError("the index gaps sum past the int64 range")
            if limit is not None and int(indices[-1]) >= limit:
                raise ValueError(f"an index ({int(indices[-1])}) is out of range: the weight has {limit} entries")
            out.copy_(indices)
        last = int(out[-1])
        written += gaps.size
        position = end
    if result.dtype != dtype:
        if result.numel() and int(result[-1]) > torch.iinfo(dtype).max:
            raise ValueError(f"an index ({int(result[-1])}) does not fit {dtype}")
        result = result.to(dtype)
    return result


# ------------------------------------------------------------------------------------------------- key names
def normalize_module_name(name: str) -> str:
    """A module name / key prefix as a checkpoint stores it: without PEFT's ``base_model.model.``, nothing else.

    The one key parser of checks and loading: a key is validated under exactly the name it is loaded into, so a
    checkpoint spelt for a wrapped model (``_orig_mod.``, ``_fsdp_wrapped_module.``) matches no layer of a plain one.
    """
    return name.removeprefix(PEFT_MODEL_PREFIX)


def align_checkpoint_keys(state_dict: Mapping[str, Any], prefixed: bool) -> dict[str, Any]:
    """The checkpoint with every key spelt as the model spells it (with or without ``base_model.model.``).

    Raises :class:`InvalidAdapterError` if two keys name the same tensor once aligned (``lin0.sara_values`` and
    ``base_model.model.lin0.sara_values``): which one would load is not the file's to decide.
    """
    aligned: dict[str, Any] = {}
    spelt: dict[str, str] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise InvalidAdapterError(f"The checkpoint has a non-string key {key!r}.")
        name = normalize_module_name(key)
        target = PEFT_MODEL_PREFIX + name if prefixed else name
        if target in aligned:
            raise InvalidAdapterError(
                f"The checkpoint holds the tensor '{name}' twice, as '{spelt[target]}' and '{key}': it is ambiguous "
                "which one would load. Keep one spelling."
            )
        aligned[target], spelt[target] = value, key
    return aligned


def split_sara_key(key: str, adapter_name: str | None = None) -> tuple[str, str] | None:
    """(normalized layer name, SaRA tensor name) of a state-dict key, or None if it is not a SaRA tensor or record.

    Accepts checkpoint keys (``base_model.model.lin0.sara_values``) and model keys (``lin0.sara_values.default``).
    """
    parts = key.split(".")
    if adapter_name is not None and len(parts) >= 2 and parts[-1] == adapter_name and parts[-2] in LAYER_TENSOR_NAMES:
        parts = parts[:-1]
    if parts[-1] not in LAYER_TENSOR_NAMES + FILE_RECORD_NAMES:
        return None
    return normalize_module_name(".".join(parts[:-1]) + ".").removesuffix("."), parts[-1]


def sibling_key(key: str, adapter_name: str | None, name: str) -> str:
    """``key`` (a SaRA tensor's key) with its tensor name replaced by ``name``, adapter suffix kept."""
    parts = key.split(".")
    position = -2 if len(parts) >= 2 and parts[-1] == adapter_name and parts[-2] in LAYER_TENSOR_NAMES else -1
    parts[position] = name
    return ".".join(parts)


# ------------------------------------------------------------------------------------------------- checksums
def checksum_name(layer_name: str) -> str:
    """The layer name a checksum covers: as saved, without ``base_model.model.`` and CLIP's ``text_model.`` (which
    transformers 5 flattened, so a text-encoder file saved before still verifies after)."""
    return normalize_module_name(layer_name).removeprefix("text_model.")


def tensors_checksum(layer_name: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """SHA-256 (32 uint8) of named tensors and the layer (or file) they belong to: its name, then each tensor's
    name, dtype, shape and bytes in sorted name order. Integrity against accidents, not security: anyone who edits the
    file can recompute it."""
    digest = hashlib.sha256(f"{checksum_name(layer_name)};".encode())
    for name in sorted(tensors):
        data = tensors[name].detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}|{str(data.dtype).removeprefix('torch.')}|{tuple(tensors[name].shape)};".encode())
        digest.update(data.view(torch.uint8).numpy())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


def entries_checksum(layer_name: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The checksum of a SaRA layer's stored tensors (encoded entries, weight shape and layout), bound to the layer's
    name."""
    return tensors_checksum(layer_name, {name: tensors[name] for name in CHECKSUMMED_NAMES if name in tensors})


def other_tensor_name(key: str, adapter_name: str | None) -> str:
    """A modules_to_save key as saved: ``head.weight`` for ``base_model.model.head.modules_to_save.<adapter>.weight``
    (PEFT inserts the wrapper path when it loads)."""
    name = normalize_module_name(key)
    return name.replace(f".modules_to_save.{adapter_name}.", ".") if adapter_name else name


def other_tensors_checksum(tensors: Mapping[str, torch.Tensor], adapter_name: str | None) -> torch.Tensor:
    """The checksum of a checkpoint's tensors that are not SaRA entries (its modules_to_save), by saved name."""
    return tensors_checksum("", {other_tensor_name(key, adapter_name): tensor for key, tensor in tensors.items()})


# ------------------------------------------------------------------------------------------------- layouts
LINEAR, CONV = "linear", "conv"
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# `sara_layout`'s first number: how the weight is used.
LAYOUT_KINDS = {0: (LINEAR, False), 1: (LINEAR, True), 2: (CONV, False)}


@dataclass(frozen=True)
class LayerLayout:
    """How a layer's weight is laid out and used, beyond its shape.

    A shape tells a matrix (2-D) from a convolution kernel (3-D to 5-D), but not transformers' ``Conv1D`` (a 2-D
    weight stored ``in x out``, the transpose of ``nn.Linear``'s) nor a convolution's ``groups``, ``dilation`` and
    ``padding_mode``. ``kind`` is ``"linear"`` or ``"conv"``; ``transposed`` marks ``in x out`` weights;
    ``conv_options`` holds a convolution's non-default settings; ``recorded`` says whether the file recorded it or it
    was guessed from the shape (files of format 1 saved by ``PeftModel.save_pretrained``).

    Stored per layer as ``sara_layout``, int64 ``[3 + spatial dims]``: kind (0 linear, 1 linear stored transposed,
    2 convolution), groups, padding mode (index into :data:`PADDING_MODES`), then the dilation of each spatial
    dimension (none for a matrix). The layer's checksum covers it.
    """

    kind: str
    transposed: bool = False
    conv_options: dict[str, Any] = field(default_factory=dict)
    recorded: bool = True

    @classmethod
    def of(cls, base_layer: nn.Module) -> LayerLayout:
        """The layout of a live base layer."""
        if not isinstance(base_layer, CONV_TYPES):
            return cls(LINEAR, transposed=not isinstance(base_layer, nn.Linear))
        options: dict[str, Any] = {}
        if base_layer.groups != 1:
            options["groups"] = base_layer.groups
        if any(d != 1 for d in base_layer.dilation):
            options["dilation"] = tuple(base_layer.dilation)
        if base_layer.padding_mode != "zeros":
            options["padding_mode"] = base_layer.padding_mode
        return cls(CONV, conv_options=options)

    @classmethod
    def from_shape(cls, shape: tuple[int, ...]) -> LayerLayout:
        """The layout a shape alone suggests (2-D: ``nn.Linear``, more: a plain convolution), marked unrecorded."""
        return cls(LINEAR if len(shape) == 2 else CONV, recorded=False)

    @classmethod
    def from_record(cls, record: Any, shape: tuple[int, ...], where: str) -> LayerLayout:
        """A layout from a format-1 file's JSON record (safetensors metadata ``peft_sara_layouts``), checked against
        the layer's weight shape."""
        if not isinstance(record, dict) or record.get("kind") not in (LINEAR, CONV):
            raise InvalidAdapterError(f"{where}: the layout record {record!r} is not a layout.")
        options = record.get("conv_options", {})
        if not isinstance(options, dict) or set(options) - {"groups", "dilation", "padding_mode"}:
            raise InvalidAdapterError(f"{where}: the layout record {record!r} has unknown convolution options.")
        options = dict(options)
        if "dilation" in options:
            dilation = options["dilation"]
            if not isinstance(dilation, list) or not all(type(d) is int for d in dilation):
                raise InvalidAdapterError(f"{where}: the layout record's dilation {dilation!r} is not a list of ints.")
            options["dilation"] = tuple(dilation)
        if "groups" in options and type(options["groups"]) is not int:
            raise InvalidAdapterError(f"{where}: the layout record's groups {options['groups']!r} is not an int.")
        layout = cls(record["kind"], record.get("transposed", False) is True, options)
        layout.check_shape(shape, where)
        return layout

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, shape: tuple[int, ...], where: str) -> LayerLayout:
        """A layout from its ``sara_layout`` tensor, checked against the layer's weight shape."""
        spatial = max(0, len(shape) - 2)
        if tensor.dtype != torch.int64 or tensor.dim() != 1 or tensor.numel() not in (3, 3 + spatial):
            raise InvalidAdapterError(
                f"{where}: the layout must be 3 (matrix) or 3 + spatial dims (kernel) int64, got dtype {tensor.dtype} "
                f"and shape {tuple(tensor.shape)}: the file is corrupted."
            )
        numbers = [int(number) for number in tensor]
        kind, groups, padding, dilation = numbers[0], numbers[1], numbers[2], tuple(numbers[3:])
        if kind not in LAYOUT_KINDS or not 0 <= padding < len(PADDING_MODES) or groups < 1:
            raise InvalidAdapterError(f"{where}: the layout {numbers} is not a layout: the file is corrupted.")
        name, transposed = LAYOUT_KINDS[kind]
        if name == LINEAR and (groups != 1 or padding != 0 or dilation):
            raise InvalidAdapterError(f"{where}: the layout {numbers} gives a matrix convolution settings.")
        options: dict[str, Any] = {}
        if groups != 1:
            options["groups"] = groups
        if any(d != 1 for d in dilation):
            options["dilation"] = dilation
        if padding:
            options["padding_mode"] = PADDING_MODES[padding]
        layout = cls(name, transposed, options)
        layout.check_shape(shape, where)
        return layout

    def check_shape(self, shape: tuple[int, ...], where: str) -> None:
        """Raise :class:`InvalidAdapterError` unless this layout can describe a weight of ``shape``."""
        problem = None
        if self.kind == LINEAR and len(shape) != 2:
            problem = f"a matrix layout on a weight of shape {shape}"
        elif self.kind == CONV and not 3 <= len(shape) <= 5:
            problem = f"a convolution layout on a weight of shape {shape}"
        elif self.kind == CONV and self.transposed:
            problem = "a transposed convolution"
        else:
            groups = self.conv_options.get("groups", 1)
            dilation = self.conv_options.get("dilation", (1,) * max(0, len(shape) - 2))
            if self.kind == CONV and (groups < 1 or shape[0] % groups):
                problem = f"{groups} groups, which do not divide the {shape[0]} output channels"
            elif self.kind == CONV and (len(dilation) != len(shape) - 2 or any(d < 1 for d in dilation)):
                problem = f"dilation {dilation} for a {len(shape) - 2}-D kernel"
            elif self.conv_options.get("padding_mode", "zeros") not in PADDING_MODES:
                problem = f"padding mode {self.conv_options['padding_mode']!r}"
        if problem is not None:
            raise InvalidAdapterError(f"{where}: the recorded layout is {problem}: the file is corrupted or edited.")

    def to_tensor(self, ndim: int) -> torch.Tensor:
        """The ``sara_layout`` tensor of this layout for a weight of ``ndim`` dimensions."""
        kind = 2 if self.kind == CONV else int(self.transposed)
        dilation = self.conv_options.get("dilation", (1,) * (ndim - 2)) if self.kind == CONV else ()
        padding = PADDING_MODES.index(self.conv_options.get("padding_mode", "zeros"))
        numbers = [kind, self.conv_options.get("groups", 1), padding, *dilation]
        return torch.tensor(numbers, dtype=torch.int64)

    def lora_problem(self, name: str) -> str | None:
        """Why a LoRA layer (PEFT's, which every LoRA reader goes through) cannot reproduce this layer's update."""
        if not self.conv_options:
            return None
        settings = ", ".join(f"{key}={value!r}" for key, value in self.conv_options.items())
        return (
            f"'{name}' (a convolution with {settings}) has no LoRA equivalent: LoRA's down convolution does not take "
            "these settings. Export with format 'diff' or merge the adapter instead."
        )


# ------------------------------------------------------------------------------------------------- writing
def _plain(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if hasattr(tensor, "full_tensor"):  # a DTensor (FSDP2, tensor parallel): the file holds the whole tensor
        tensor = tensor.full_tensor()
    if tensor.is_meta:
        raise ValueError(f"Cannot save '{key}': it is on the meta device (never loaded). Load the adapter first.")
    return tensor.detach()


def _encoded_entries(index_key: str, indices: torch.Tensor, value_key: str, values: torch.Tensor, adapter_name: str):
    """The stored form of one entry set: sorted by index, indices as varint gaps."""
    indices, values = _plain(index_key, indices), _plain(value_key, values)
    index_name = split_sara_key(index_key, adapter_name)[1]
    stream, values = encode_entries(indices, values)
    return {sibling_key(index_key, adapter_name, STORED_INDEX_NAME[index_name]): stream, value_key: values.contiguous()}


def encode_adapter_state_dict(
    model: nn.Module,
    adapter_name: str,
    state_dict: dict[str, torch.Tensor],
    save_dtype: str | None,
    modules_to_save: Mapping[str, torch.Tensor] | None = None,
    config_fingerprint: str | None = None,
) -> dict[str, torch.Tensor]:
    """An adapter state dict (model keys, adapter name still in them) in the file format: empty frozen sets dropped,
    values cast to ``save_dtype``, indices sorted and written as gaps, weight shapes, checksums, format version and
    ``config_fingerprint`` (the saved config's ``settings_fingerprint()``, hex) added. Other tensors are kept as they
    are; they and ``modules_to_save`` (the copies a writer adds to the file after this, as PEFT's
    ``get_peft_model_state_dict`` does) are covered by one checksum."""
    from .layer import sara_layers  # the layer imports PEFT: reading files (this module's other callers) does not

    # FSDP and activation checkpointing wrap modules but drop their wrapper names from state-dict keys: so does this.
    layers = {
        normalize_module_name(re.sub(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module)\.", "", name)): layer
        for name, layer in sara_layers(model)
        if layer.present_adapters([adapter_name])
    }
    grouped: dict[str, dict[str, str]] = {}
    others = {}
    for key, tensor in state_dict.items():
        split = split_sara_key(key, adapter_name)
        if split is None or split[1] not in LAYER_ENTRY_NAMES:
            others[key] = _plain(key, tensor)
        else:
            grouped.setdefault(split[0], {})[split[1]] = key
    value_dtype = getattr(torch, save_dtype) if save_dtype is not None else None
    encoded = {}
    # Each layer's checksum is hashed in a worker thread while the next layers are encoded (hashlib releases the GIL).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sara-save-checksums") as executor:
        checksums = _encode_layers(grouped, layers, state_dict, adapter_name, value_dtype, encoded, executor)
        for key, future in checksums.items():
            encoded[key] = future.result()
    prefix = PEFT_MODEL_PREFIX if all(key.startswith(PEFT_MODEL_PREFIX) for key in state_dict) else ""
    encoded[prefix + FORMAT_VERSION_NAME] = torch.tensor([FORMAT_VERSION], dtype=torch.int64)
    covered = others | {key: _plain(key, tensor) for key, tensor in (modules_to_save or {}).items()}
    encoded[prefix + OTHER_CHECKSUM_NAME] = other_tensors_checksum(covered, adapter_name)
    if config_fingerprint is not None:
        encoded[prefix + CONFIG_FINGERPRINT_NAME] = torch.tensor(
            list(bytes.fromhex(config_fingerprint)), dtype=torch.uint8
        )
    return {**others, **encoded}


def _encode_layers(grouped, layers, state_dict, adapter_name, value_dtype, encoded, executor) -> dict[str, Future]:
    """Encode every layer's entries into ``encoded`` (in the order of ``grouped``); returns each layer's checksum key
    with its checksum, submitted to ``executor`` once the layer's tensors are complete."""
    checksums = {}
    for layer_name, keys in grouped.items():
        layer = layers.get(layer_name)
        if layer is None or "sara_indices" not in keys or "sara_values" not in keys:
            raise ValueError(
                f"Cannot save SaRA layer '{layer_name}' of adapter '{adapter_name}': the state dict lacks its indices "
                "or values, or the model has no such layer."
            )
        tensors = {}
        for index_name, value_name in (("sara_indices", "sara_values"), ("sara_frozen_indices", "sara_frozen_values")):
            if index_name not in keys:
                continue
            indices, values = state_dict[keys[index_name]], state_dict[keys[value_name]]
            if index_name == "sara_frozen_indices" and indices.numel() == 0:
                continue  # nothing re-selected yet
            values = values.to(value_dtype) if value_dtype is not None else values
            tensors.update(_encoded_entries(keys[index_name], indices, keys[value_name], values, adapter_name))
        shape_key = sibling_key(keys["sara_indices"], adapter_name, WEIGHT_SHAPE_NAME)
        tensors[shape_key] = torch.tensor(tuple(layer.weight_shape), dtype=torch.int64)
        layout = LayerLayout.of(layer.get_base_layer()).to_tensor(len(layer.weight_shape))
        tensors[sibling_key(keys["sara_indices"], adapter_name, LAYOUT_NAME)] = layout
        by_name = {split_sara_key(key, adapter_name)[1]: tensor for key, tensor in tensors.items()}
        checksum_key = sibling_key(keys["sara_indices"], adapter_name, CHECKSUM_NAME)
        checksums[checksum_key] = executor.submit(entries_checksum, layer_name, by_name)
        encoded.update(tensors)
    return checksums


# ------------------------------------------------------------------------------------------------- reading
def check_legacy_archive(path: Path) -> None:
    """Refuse a legacy ``adapter_model.bin`` that could cost more than its size to read: anything but ``torch.save``'s
    zip archive with stored (uncompressed) members whose sizes add up to at most the file's. A deflate-compressed
    member would expand (up to ~1000x) before any check; the older tar / raw-pickle formats allocate storages of
    whatever size they claim. Read before any member is expanded: the zip's central directory only."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise InvalidAdapterError(
            f"'{path}' is not a zip archive (torch.save's format since PyTorch 1.6): older pickle formats are refused, "
            f"as their sizes cannot be checked before reading ({err}). Save the adapter again as safetensors."
        ) from err
    compressed = [member.filename for member in members if member.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise InvalidAdapterError(
            f"'{path}' holds compressed members ({compressed[:3]}), which torch.save never writes and which would "
            "expand before any check: the file is not a PyTorch checkpoint as saved. Save the adapter as safetensors."
        )
    claimed = sum(member.file_size for member in members)
    if claimed > size:
        raise InvalidAdapterError(f"'{path}' claims {claimed} bytes of members in a {size}-byte file: it is corrupted.")


@dataclass
class LayerCheckpoint:
    """The tensors a checkpoint holds for one SaRA layer, by SaRA tensor name, with their state-dict keys."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)


@dataclass
class ParsedCheckpoint:
    """A SaRA checkpoint split into per-layer tensors, its records and every other key."""

    layers: dict[str, LayerCheckpoint]
    record_keys: list[str]
    other_keys: list[str]
    other_checksum: torch.Tensor
    version: int = FORMAT_VERSION
    config_fingerprint: torch.Tensor | None = None  # format 3: see CONFIG_FINGERPRINT_NAME


def _read_version(key: str, tensor: torch.Tensor) -> int:
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.numel() != 1:
        raise InvalidAdapterError(
            f"'{key}' must be one integer (the SaRA file format version), got dtype {tensor.dtype} and shape "
            f"{tuple(tensor.shape)}: the file is corrupted."
        )
    version = int(tensor.reshape(-1)[0])
    if version not in READABLE_VERSIONS:
        raise InvalidAdapterError(
            f"The checkpoint uses SaRA file format {version}; this peft-sara reads formats {READABLE_VERSIONS} "
            "(see `peft_sara.tuner.file_format`). Save the adapter again with this version, or use the peft-sara that "
            "wrote it."
        )
    return version


def checked_checksum(where: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if it has a checksum's form (32 uint8), else :class:`InvalidAdapterError`."""
    if tensor.dtype != torch.uint8 or tuple(tensor.shape) != (CHECKSUM_BYTES,):
        raise InvalidAdapterError(
            f"{where} must be {CHECKSUM_BYTES} uint8, got dtype {tensor.dtype} and shape {tuple(tensor.shape)}: the "
            "file is corrupted."
        )
    return tensor


def parse_checkpoint(state_dict: Mapping[str, Any], adapter_name: str | None = None) -> ParsedCheckpoint:
    """Group a checkpoint's stored SaRA tensors by layer and read its file records.

    Raises :class:`InvalidAdapterError` on non-tensors, repeated tensors, raw (unencoded) index tensors, a missing or
    foreign format version and a missing modules_to_save checksum. What the layers' tensors hold is checked later
    (``peft_sara.tuner.reader``).
    """
    layers: dict[str, LayerCheckpoint] = {}
    version_key, version, record_keys, other_keys, other_checksum, fingerprint = None, None, [], [], None, None
    for key, tensor in state_dict.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise InvalidAdapterError(f"The checkpoint entry {key!r} is a {type(tensor).__name__}, not a tensor.")
        split = split_sara_key(key, adapter_name)
        if split is None:
            other_keys.append(key)
            continue
        layer_name, name = split
        if name == FORMAT_VERSION_NAME:
            if version_key is not None:
                raise InvalidAdapterError(f"The checkpoint holds two format versions: '{version_key}' and '{key}'.")
            version = _read_version(key, tensor)
            version_key = key
            record_keys.append(key)
            continue
        if name == OTHER_CHECKSUM_NAME:
            if other_checksum is not None or layer_name:
                raise InvalidAdapterError(
                    f"The checkpoint holds a misplaced or second '{OTHER_CHECKSUM_NAME}': '{key}'."
                )
            other_checksum = checked_checksum(f"'{key}'", tensor)
            record_keys.append(key)
            continue
        if name == CONFIG_FINGERPRINT_NAME:
            if fingerprint is not None or layer_name:
                raise InvalidAdapterError(f"The checkpoint holds a misplaced or second '{name}': '{key}'.")
            fingerprint = checked_checksum(f"'{key}'", tensor)
            record_keys.append(key)
            continue
        if name in STORED_INDEX_NAME:
            raise InvalidAdapterError(
                f"The checkpoint stores '{key}' as raw indices; SaRA files store them as '{STORED_INDEX_NAME[name]}' "
                "(varint gaps, see `peft_sara.tuner.file_format`). Was it written by another tool?"
            )
        layer = layers.setdefault(layer_name, LayerCheckpoint())
        if name in layer.tensors:
            raise InvalidAdapterError(
                f"The checkpoint holds '{name}' of SaRA layer '{layer_name}' twice: '{layer.keys[name]}' and '{key}'."
            )
        layer.tensors[name], layer.keys[name] = tensor, key
        if name in RECORD_NAMES + (LAYOUT_NAME,):
            record_keys.append(key)
    if version_key is None:
        raise InvalidAdapterError(
            f"The checkpoint has no '{FORMAT_VERSION_NAME}': it is not a SaRA adapter file, or it was edited after "
            "saving."
        )
    if other_checksum is None:
        raise InvalidAdapterError(
            f"The checkpoint has no '{OTHER_CHECKSUM_NAME}', which every SaRA file has: the file is corrupted or was "
            "edited after saving."
        )
    return ParsedCheckpoint(layers, record_keys, other_keys, other_checksum, version, fingerprint)


__all__ = [
    "FORMAT_VERSION",
    "InvalidAdapterError",
    "LayerCheckpoint",
    "ParsedCheckpoint",
    "align_checkpoint_keys",
    "check_legacy_archive",
    "count_index_gaps",
    "decode_index_gaps",
    "encode_index_gaps",
    "encode_adapter_state_dict",
    "entries_checksum",
    "LayerLayout",
    "normalize_module_name",
    "other_tensors_checksum",
    "parse_checkpoint",
    "sibling_key",
    "split_sara_key",
    "tensors_checksum",
]
