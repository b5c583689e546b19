"""The index-gap codec of peft-sara up to d340006 (file_format.py before the numpy rewrite), kept as the reference the
current encoder and decoder are compared with byte for byte (tests/test_index_gap_codec.py)."""

from __future__ import annotations

import torch

MAX_VARINT_BYTES = 9  # 9 x 7 = 63 bits: every non-negative int64


def encode_index_gaps(indices: torch.Tensor) -> torch.Tensor:
    """The varint gap stream (1-D uint8) of ascending (non-decreasing) non-negative flat indices.

    Raises ``ValueError`` if the indices are negative or not ascending: sort the entries first (with their values).
    """
    flat = indices.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
    if flat.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    gaps = torch.diff(flat, prepend=flat.new_zeros(1))
    if bool((gaps < 0).any()) or int(flat[0]) < 0:
        raise ValueError("Only ascending, non-negative indices can be written as gaps: sort the entries first.")
    lengths = torch.ones_like(gaps)
    for extra in range(1, MAX_VARINT_BYTES):
        lengths += gaps >= (1 << (7 * extra))
    starts = torch.cumsum(lengths, 0) - lengths
    stream = torch.empty(int(lengths.sum()), dtype=torch.int64)
    for position in range(int(lengths.max())):
        has_byte = lengths > position
        byte = (gaps[has_byte] >> (7 * position)) & 0x7F
        byte |= (lengths[has_byte] - 1 > position).long() << 7  # continuation bit on all but the last byte
        stream[starts[has_byte] + position] = byte
    return stream.to(torch.uint8)


DECODE_CHUNK_BYTES = 1 << 20  # decoded piece by piece: the work memory is a few tens of MB whatever the stream


def count_index_gaps(stream: torch.Tensor) -> int:
    """How many numbers a varint gap stream holds (its last bytes), without decoding it; checks its form."""
    if stream.dtype != torch.uint8 or stream.dim() != 1:
        raise ValueError(
            f"index gaps must be a 1-D uint8 byte stream, got dtype {stream.dtype} and shape {tuple(stream.shape)}"
        )
    return sum(
        int((stream[start : start + DECODE_CHUNK_BYTES] < 0x80).sum())
        for start in range(0, stream.numel(), DECODE_CHUNK_BYTES)
    )


def _decode_piece(piece: torch.Tensor) -> torch.Tensor:
    """The gaps (int64) of a uint8 stream piece that ends with a number's last byte: a one-byte number is its byte;
    the few longer ones (a gap of 128 or more) are completed byte by byte."""
    ends = torch.nonzero(piece < 0x80).reshape(-1)
    gaps = piece[ends].long()
    if ends.numel() == piece.numel():
        return gaps
    spans = torch.diff(ends, prepend=ends.new_full((1,), -1))  # each number's length in bytes
    longer = torch.nonzero(spans > 1).reshape(-1)
    length = spans[longer]
    longest = int(length.max())
    if longest > MAX_VARINT_BYTES:
        raise ValueError(f"an index gap is longer than {MAX_VARINT_BYTES} bytes (more than 63 bits)")
    first = ends[longer] - (length - 1)
    value = (piece[first] & 0x7F).long()
    for byte in range(1, longest):  # every longer number has a second byte; fewer have each next one
        has = None if byte == 1 else torch.nonzero(length > byte).reshape(-1)
        positions = first + byte if has is None else first[has] + byte
        contribution = (piece[positions] & 0x7F).long() << (7 * byte)
        if has is None:
            value += contribution
        else:
            value[has] += contribution
    gaps[longer] = value
    return gaps


def decode_index_gaps(
    stream: torch.Tensor, dtype: torch.dtype = torch.int64, count: int | None = None, limit: int | None = None
) -> torch.Tensor:
    """The flat indices (1-D, ``dtype``) a varint gap stream encodes; the inverse of :func:`encode_index_gaps`.

    ``count``: the number of indices expected (one per value), compared before the result is allocated; ``limit``:
    every index must be below it (the weight's size), checked piece by piece. The stream is decoded in pieces of
    :data:`DECODE_CHUNK_BYTES`, so the memory used beyond the result (8 bytes per index) is bounded.

    Raises ``ValueError`` on a stream that is not a 1-D uint8 tensor or not a valid encoding (see above), or that does
    not hold ``count`` indices below ``limit``.
    """
    found = count_index_gaps(stream)
    if count is not None and found != count:
        raise ValueError(f"the index gap stream holds {found} indices but {count} values")
    if stream.numel() and int(stream[-1]) >= 0x80:
        raise ValueError("the index gap stream ends inside a number (truncated)")
    result = torch.empty(found, dtype=torch.int64)
    position, written, last = 0, 0, 0
    while position < stream.numel():
        end = min(position + max(DECODE_CHUNK_BYTES, MAX_VARINT_BYTES), stream.numel())
        if end < stream.numel():  # cut after the piece's last complete number
            terminators = torch.nonzero(stream[position:end] < 0x80).reshape(-1)
            if terminators.numel() == 0:
                raise ValueError(f"an index gap is longer than {MAX_VARINT_BYTES} bytes (more than 63 bits)")
            end = position + int(terminators[-1]) + 1
        gaps = _decode_piece(stream[position:end])
        # Gaps are non-negative (at most 63 bits): the sums can only go wrong by passing the int64 range.
        may_overflow = last + int(gaps.max()) * gaps.numel() > 2**63 - 1
        gaps[0] += last
        indices = torch.cumsum(gaps, 0)
        if may_overflow and (
            bool((indices < last).any()) or (indices.numel() > 1 and not bool((indices[1:] >= indices[:-1]).all()))
        ):
            raise ValueError("the index gaps sum past the int64 range")
        last = int(indices[-1])
        if limit is not None and last >= limit:
            raise ValueError(f"an index ({last}) is out of range: the weight has {limit} entries")
        result[written : written + indices.numel()] = indices
        written += indices.numel()
        position = end
    if result.numel() and int(result[-1]) > torch.iinfo(dtype).max:
        raise ValueError(f"an index ({int(result[-1])}) does not fit {dtype}")
    return result.to(dtype)
