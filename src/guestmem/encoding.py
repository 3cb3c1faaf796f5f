"""How a Python argument becomes the fixed-width field the kernel reads.

Both backends normalise every ioctl argument here before anything else, so a value the
kernel would see as -1, or a value no field can hold, behaves the same on either backend:
negative values wrap to two's complement (they reach the kernel and get its errno); a value
that no field of that width can hold never reaches it (EINVAL naming the field).

Types are never converted: an integer argument must be an ``int`` (``bool`` and IntEnum are
ints), data must be bytes-like; anything else is TypeError naming the argument
(``check_int``, ``bytes_arg``). README "Input contract" states the rules.
"""

from __future__ import annotations

import errno
from typing import Any, Iterable

from .errors import oserror

def check_int(value: Any, field: str) -> None:
    """TypeError naming ``field`` unless ``value`` is an int (bool included): no ``int()`` of
    floats, strings or bytes."""
    if value.__class__ is not int and not isinstance(value, int):
        raise TypeError(f"{field} must be an int, not {type(value).__name__}")


def check_type(value: Any, cls: type | tuple[type, ...], field: str) -> None:
    """TypeError naming ``field`` unless ``value`` is a ``cls`` (e.g. a Regs for set_regs)."""
    if not isinstance(value, cls):
        names = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        raise TypeError(f"{field} must be a {names}, not {type(value).__name__}")


def check_sregs_types(sregs: Any) -> None:
    """The object kinds KVM_SET_SREGS takes, on both backends: an Sregs whose segments are
    Segments, gdt/idt DTables and interrupt_bitmap a tuple or list (TypeError naming the field)."""
    from .types import DTable, Segment, Sregs

    check_type(sregs, Sregs, "sregs")
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        check_type(getattr(sregs, name), Segment, f"sregs.{name}")
    for name in ("gdt", "idt"):
        check_type(getattr(sregs, name), DTable, f"sregs.{name}")
    check_type(sregs.interrupt_bitmap, (tuple, list), "sregs.interrupt_bitmap")


def bytes_arg(data: Any, field: str) -> memoryview:
    """``data`` as a flat byte view; TypeError naming ``field`` unless it is bytes-like."""
    if isinstance(data, str):
        raise TypeError(f"{field} must be bytes-like, not str")
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"{field} must be bytes-like, not {type(data).__name__}") from None
    if view.format != "B" or view.ndim != 1:
        view = memoryview(view.tobytes())
    return view


def encode_unsigned(value: int, bits: int, field: str) -> int:
    """``value`` as the two's-complement unsigned ``bits``-wide field the kernel reads.

    :raises OSError: EINVAL if ``value < -2**(bits-1)`` or ``value >= 2**bits``.
    """
    if value.__class__ is int and value >= 0 and not value >> bits:
        return value  # a plain int in range, as nearly every call passes: no further work
    check_int(value, field)
    if not -(1 << (bits - 1)) <= value < (1 << bits):
        raise oserror(errno.EINVAL, f"{field}={value:#x} does not fit in a u{bits}")
    return value & ((1 << bits) - 1)


def encode_signed(value: int, bits: int, field: str) -> int:
    """``value`` as the signed ``bits``-wide field (e.g. loff_t) the kernel reads: values up to
    2**bits - 1 are accepted and reinterpreted, as the kernel would see their bits.

    :raises OSError: EINVAL if no ``bits``-wide field can hold ``value``.
    """
    if value.__class__ is int and value >= 0 and not value >> (bits - 1):
        return value  # a plain int that is non-negative as the field reads it
    value = encode_unsigned(value, bits, field)
    return value - (1 << bits) if value >> (bits - 1) else value


def encode_fd(obj: Any, field: str) -> int:
    """A u32 fd field from None (0), an int (negative wraps: -1 → 0xFFFFFFFF), or anything
    with ``fileno()``. A closed object encodes as -1 so the kernel, not the wrapper, decides
    the errno at its own place in the check order (EBADF at bind time)."""
    if obj is None:
        return 0
    if isinstance(obj, int):
        return encode_unsigned(obj, 32, field)
    fileno = getattr(obj, "fileno", None)
    if not callable(fileno):
        raise TypeError(f"{field} must be a file object, an int fd or None, not {type(obj).__name__}")
    try:
        fd = fileno()
    except (OSError, ValueError):
        fd = -1
    return encode_unsigned(fd, 32, field)


def encode_array(values: Iterable[int] | None, length: int, bits: int, field: str) -> list[int]:
    """A fixed-length array field (None = zeros), each element encoded as ``bits`` wide.

    :raises OSError: EINVAL if there are more than ``length`` values or one does not fit.
    """
    if values is None:
        items: list = []
    elif isinstance(values, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"{field} must be a sequence of ints, not {type(values).__name__}")
    else:
        try:
            items = list(values)
        except TypeError:
            raise TypeError(f"{field} must be a sequence of ints, not {type(values).__name__}") from None
    if len(items) > length:
        raise oserror(errno.EINVAL, f"{field} has {len(items)} elements; the struct holds {length}")
    return [encode_unsigned(v, bits, f"{field}[{i}]") for i, v in enumerate(items)] + [0] * (length - len(items))


def msr_indices(indices: Iterable[int]) -> list[int]:
    """KVM_GET_MSRS's indices as the u32 ``index`` fields of struct kvm_msr_entry."""
    if isinstance(indices, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"MSR indices must be a sequence of ints, not {type(indices).__name__}")
    return [encode_unsigned(i, 32, "index") for i in indices]


def msr_entries(entries: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """KVM_SET_MSRS's (index, value) pairs as u32 ``index`` and u64 ``data`` fields, entry by
    entry; TypeError for an entry that is not a 2-tuple or 2-list."""
    if isinstance(entries, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"MSR entries must be a sequence of (index, value) pairs, not {type(entries).__name__}")
    out = []
    for e in entries:
        if not isinstance(e, (tuple, list)) or len(e) != 2:
            raise TypeError(f"an MSR entry is an (index, value) pair, not {type(e).__name__} {e!r:.40}")
        out.append((encode_unsigned(e[0], 32, "index"), encode_unsigned(e[1], 64, "data")))
    return out
