"""uapi structs <-> ``guestmem.types`` dataclasses, field by field (same names), and the
dedicated codecs of kvm_regs and kvm_sregs (the structs every exit path reads).

The kvm backend encodes its arguments with these and decodes the kernel's answers; the
drop-in /dev/kvm (``devkvm``) does the mirror image on the structs a C program passes. One
codec for both keeps the two sides of the ABI from drifting apart.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
from typing import Any, TypeVar

from . import uapi
from .encoding import check_sregs_types, check_type, encode_unsigned
from .errors import oserror
from .types import DTable, ExceptionEvent, InterruptEvent, NmiEvent, Regs, Segment, SmiEvent, Sregs, TripleFaultEvent

__all__ = ["struct_to_value", "value_to_struct", "encode_field", "check_bytes", "regs_from_struct", "regs_to_struct",
           "sregs_from_struct", "sregs_to_struct"]

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


# --- kvm_regs and kvm_sregs -----------------------------------------------------------------------

_REG_NAMES = tuple(name for name, _ in uapi.kvm_regs._fields_)
_SEG_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SEG_FIELDS = tuple(name for name, _ in uapi.kvm_segment._fields_ if name != "padding")


def regs_from_struct(s: uapi.kvm_regs) -> Regs:
    return Regs(**{name: getattr(s, name) for name in _REG_NAMES})


def regs_to_struct(regs: Regs, s: uapi.kvm_regs | None = None, validate: bool = True) -> uapi.kvm_regs:
    """Fill ``s`` (a new kvm_regs by default) from ``regs``: TypeError for a non-``Regs`` or a
    non-int register, EINVAL for one that does not fit 64 bits. ``validate=False`` is for
    values the model produced (the drop-in's KVM_GET_REGS): checking 18 registers it already
    holds as u64 costs ~1.1 of the drop-in's 2.4 µs per call (``guestmem bench dropin``)."""
    s = uapi.kvm_regs() if s is None else s
    if not validate:
        for name in _REG_NAMES:
            setattr(s, name, getattr(regs, name))
        return s
    check_type(regs, Regs, "regs")
    for name in _REG_NAMES:
        setattr(s, name, encode_unsigned(getattr(regs, name), 64, name))
    return s


def sregs_from_struct(s: uapi.kvm_sregs) -> Sregs:
    segs = {n: Segment(**{f: getattr(getattr(s, n), f) for f in _SEG_FIELDS}) for n in _SEG_NAMES}
    return Sregs(
        **segs,
        gdt=DTable(base=s.gdt.base, limit=s.gdt.limit),
        idt=DTable(base=s.idt.base, limit=s.idt.limit),
        cr0=s.cr0, cr2=s.cr2, cr3=s.cr3, cr4=s.cr4, cr8=s.cr8, efer=s.efer, apic_base=s.apic_base,
        interrupt_bitmap=tuple(s.interrupt_bitmap),
    )


def sregs_to_struct(sregs: Sregs, s: uapi.kvm_sregs | None = None) -> uapi.kvm_sregs:
    """Fill ``s`` (a new, zeroed kvm_sregs by default; padding is left as it is) from ``sregs``:
    TypeError for wrong types, EINVAL for a field that does not fit or an interrupt bitmap of
    the wrong length."""
    check_sregs_types(sregs)
    s = uapi.kvm_sregs() if s is None else s
    for n in _SEG_NAMES:
        seg, out = getattr(sregs, n), getattr(s, n)
        for f, ctype in uapi.kvm_segment._fields_:
            if f != "padding":
                setattr(out, f, encode_unsigned(getattr(seg, f), ctypes.sizeof(ctype) * 8, f"{n}.{f}"))
    for n in ("gdt", "idt"):
        table, out = getattr(sregs, n), getattr(s, n)
        out.base = encode_unsigned(table.base, 64, f"{n}.base")
        out.limit = encode_unsigned(table.limit, 16, f"{n}.limit")
    for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        setattr(s, n, encode_unsigned(getattr(sregs, n), 64, n))
    if len(sregs.interrupt_bitmap) != len(s.interrupt_bitmap):
        raise oserror(errno.EINVAL, f"interrupt_bitmap needs {len(s.interrupt_bitmap)} words")
    for i, word in enumerate(sregs.interrupt_bitmap):
        s.interrupt_bitmap[i] = encode_unsigned(word, 64, f"interrupt_bitmap[{i}]")
    return s
