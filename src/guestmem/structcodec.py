"""uapi structs <-> ``guestmem.types`` dataclasses, field by field (same names).

The kvm backend encodes its arguments with these and decodes the kernel's answers; the
drop-in /dev/kvm (``devkvm``) does the mirror image on the structs a C program passes. One
codec for both keeps the two sides of the ABI from drifting apart.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
from typing import Any, TypeVar

from .encoding import encode_unsigned
from .errors import oserror
from .types import ExceptionEvent, InterruptEvent, NmiEvent, SmiEvent, TripleFaultEvent

__all__ = ["struct_to_value", "value_to_struct", "encode_field", "check_bytes"]

_T = TypeVar("_T")
# Nested struct members of kvm_vcpu_events and the dataclass each becomes.
_NESTED: dict[str, type] = {"exception": ExceptionEvent, "interrupt": InterruptEvent, "nmi": NmiEvent,
                            "smi": SmiEvent, "triple_fault": TripleFaultEvent}


def struct_to_value(cls: type[_T], s: ctypes.Structure) -> _T:
    """The ``types`` dataclass ``cls`` from struct ``s``, field by field (same names).

    Nested structs become their ``_NESTED`` dataclass; arrays of byte arrays become tuples of
    bytes, arrays of integers tuples of ints.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        v = getattr(s, f.name)
        if isinstance(v, ctypes.Structure):
            v = struct_to_value(_NESTED[f.name], v)
        elif isinstance(v, ctypes.Array):
            v = tuple(bytes(x) if isinstance(x, ctypes.Array) else int(x) for x in v)
        out[f.name] = v
    return cls(**out)


def value_to_struct(value: Any, s: ctypes.Structure, what: str) -> ctypes.Structure:
    """Fill struct ``s`` from dataclass ``value`` (the inverse of ``struct_to_value``).

    :raises TypeError: a field of the wrong Python type (int for integers, bytes for registers).
    :raises OSError: EINVAL for an integer that does not fit its field or a byte string or
        tuple of the wrong length.
    """
    ctypes_of: dict[str, Any] = {f[0]: f[1] for f in type(s)._fields_}
    for f in dataclasses.fields(value):
        v, name, ctype = getattr(value, f.name), f"{what}.{f.name}", ctypes_of[f.name]
        if issubclass(ctype, ctypes.Structure):  # a nested struct: its dataclass only
            if type(v) is not _NESTED[f.name]:
                raise TypeError(f"{name} must be a {_NESTED[f.name].__name__}, not {type(v).__name__}")
            value_to_struct(v, getattr(s, f.name), name)
        elif issubclass(ctype, ctypes.Array):
            arr = getattr(s, f.name)
            if not isinstance(v, tuple) or len(v) != len(arr):
                raise TypeError(f"{name} must be a tuple of {len(arr)} values") if not isinstance(v, tuple) \
                    else oserror(errno.EINVAL, f"{name} has {len(v)} elements; the struct holds {len(arr)}")
            for i, item in enumerate(v):
                if isinstance(arr[i], ctypes.Array):
                    check_bytes(item, len(arr[i]), f"{name}[{i}]")
                    ctypes.memmove(ctypes.addressof(arr[i]), bytes(item), len(item))
                else:
                    arr[i] = encode_field(item, ctypes.sizeof(ctype._type_) * 8, f"{name}[{i}]")
        else:
            setattr(s, f.name, encode_field(v, ctypes.sizeof(ctype) * 8, name))
    return s


def encode_field(v: Any, bits: int, name: str) -> int:
    """An int field of ``bits`` bits: TypeError for a non-int (bools too), EINVAL if it does not fit."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    return encode_unsigned(v, bits, name)


def check_bytes(v: Any, size: int, name: str) -> None:
    """A byte-string field of exactly ``size`` bytes: TypeError for a non-bytes value, EINVAL otherwise."""
    if not isinstance(v, (bytes, bytearray)):
        raise TypeError(f"{name} must be bytes, not {type(v).__name__}")
    if len(v) != size:
        raise oserror(errno.EINVAL, f"{name} is {len(v)} bytes; the field holds {size}")
