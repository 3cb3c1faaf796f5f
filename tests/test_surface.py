"""The two backends export the same public surface, and both satisfy the interface Protocols."""

from __future__ import annotations

import inspect

import pytest

import guestmem.kvm
import guestmem.model
from guestmem import interface

CLASSES = ["System", "Vm", "GuestMemfd", "Vcpu"]
# Model-only extensions, documented as such in guestmem.model.
MODEL_EXTRAS = {"GUESTMEM_TDX_LIKE_VM", "Memslot", "Profile", "PROFILES"}


def public_methods(cls: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(cls, callable) if not name.startswith("_")}


def test_packages_export_the_same_names() -> None:
    assert set(guestmem.kvm.__all__) == set(guestmem.model.__all__) - MODEL_EXTRAS


@pytest.mark.parametrize("name", CLASSES)
def test_model_has_every_kvm_method(name: str) -> None:
    kvm_cls, model_cls = getattr(guestmem.kvm, name), getattr(guestmem.model, name)
    assert public_methods(kvm_cls) <= public_methods(model_cls)


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("package", [guestmem.kvm, guestmem.model], ids=["kvm", "model"])
def test_protocol_methods_have_the_same_signature(package, name: str) -> None:
    proto = getattr(interface, name)
    cls = getattr(package, name)
    for meth in public_methods(proto):
        want = inspect.signature(getattr(proto, meth))
        got = inspect.signature(getattr(cls, meth))
        assert list(got.parameters) == list(want.parameters), f"{package.__name__}.{name}.{meth}{got} != {want}"


def shape(sig: inspect.Signature) -> list[tuple[str, object, object]]:
    """A signature without its annotations (the two backends spell them differently)."""
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("name", CLASSES)
def test_shared_methods_take_the_same_arguments(name: str) -> None:
    """Every public method both backends have takes the same parameters, in the same order,
    of the same kind, with the same defaults: code written against one runs on the other."""
    kvm_cls, model_cls = getattr(guestmem.kvm, name), getattr(guestmem.model, name)
    for meth in sorted(public_methods(kvm_cls) & public_methods(model_cls)):
        want = inspect.signature(getattr(kvm_cls, meth))
        got = inspect.signature(getattr(model_cls, meth))
        assert shape(got) == shape(want), f"{name}.{meth}: model {got} != kvm {want}"


@pytest.mark.parametrize("name", CLASSES)
def test_shared_properties_are_properties_on_both(name: str) -> None:
    """A class-level property of one backend is a property (not a method) on the other."""
    kvm_cls, model_cls = getattr(guestmem.kvm, name), getattr(guestmem.model, name)
    for attr in sorted(set(dir(kvm_cls)) & set(dir(model_cls))):
        if attr.startswith("_"):
            continue
        k, m = inspect.getattr_static(kvm_cls, attr), inspect.getattr_static(model_cls, attr)
        assert isinstance(k, property) == isinstance(m, property), f"{name}.{attr}: kvm {k!r}, model {m!r}"



def public_properties(cls: type) -> set[str]:
    return {name for name in dir(cls)
            if not name.startswith("_") and isinstance(inspect.getattr_static(cls, name), property)}


@pytest.mark.parametrize("name", CLASSES)
def test_model_has_every_kvm_property(name: str) -> None:
    """A property of the kvm class (``closed``, ``stats_fd``...) is a property of the model's too:
    the shared-names tests above cannot see a property only one backend has."""
    kvm_cls, model_cls = getattr(guestmem.kvm, name), getattr(guestmem.model, name)
    assert public_properties(kvm_cls) <= public_properties(model_cls)


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("package", [guestmem.kvm, guestmem.model], ids=["kvm", "model"])
def test_every_object_is_a_closable_context_manager(package, name: str) -> None:
    cls = getattr(package, name)
    assert isinstance(inspect.getattr_static(cls, "closed"), property)
    for meth in ("close", "__enter__", "__exit__"):
        assert callable(getattr(cls, meth)), f"{package.__name__}.{name}.{meth}"


def objects_of(system) -> dict:
    """One open object of each kind on ``system``'s backend."""
    vm = system.create_vm()
    return {"System": system, "Vm": vm, "GuestMemfd": vm.create_guest_memfd(4096), "Vcpu": vm.create_vcpu(0)}


def test_objects_satisfy_the_protocols(system) -> None:
    """Every member of each Protocol, data members (size, flags, vcpu_id, type, backend) and
    ``closed`` included, is present on the object a backend returns."""
    objects = objects_of(system)
    for name, obj in objects.items():
        assert isinstance(obj, getattr(interface, name)), name
    for name in ("Vcpu", "GuestMemfd", "Vm"):
        objects[name].close()


@pytest.mark.parametrize("name", ["Vcpu", "GuestMemfd", "Vm", "System"])
def test_closed_and_the_context_manager_agree_on_both_backends(system, name: str) -> None:
    """``with obj as o`` gives the object itself and closes it on exit; ``closed`` follows;
    entering a closed object is EBADF, as is every method."""
    import errno

    objects = objects_of(system)
    obj = objects[name]
    assert obj.closed is False
    with obj as entered:
        assert entered is obj and not obj.closed
    assert obj.closed is True
    with pytest.raises(OSError) as exc:
        obj.__enter__()
    assert exc.value.errno == errno.EBADF
    with pytest.raises(OSError) as exc:
        obj.fileno()
    assert exc.value.errno == errno.EBADF
    obj.close()  # idempotent
    assert obj.closed is True
    for other in ("Vcpu", "GuestMemfd", "Vm"):
        objects[other].close()


# Arguments no kernel field can hold are refused the same way on both backends (EINVAL naming
# the field), while negative values wrap and reach the kernel's own checks.
OUT_OF_RANGE_CALLS = [
    ("create_guest_memfd", (1 << 64,), {}),
    ("create_guest_memfd", (4096,), {"flags": -(1 << 63) - 1}),
    ("create_guest_memfd", (4096,), {"reserved": [0] * 7}),
    ("set_user_memory_region2", (1 << 32, 0, 0, 4096), {}),
    ("set_user_memory_region2", (0, 0, 0, 4096), {"pad2": [1 << 64]}),
    ("set_user_memory_region2", (0, 0, 0, 4096), {"guest_memfd": 1 << 32}),
    ("set_user_memory_region", (0, 1 << 32, 0, 4096), {}),
    ("set_memory_attributes", (0, 1 << 64, 0), {}),
    ("enable_cap", (201, 1, 2, 3, 4, 5), {}),
]


@pytest.mark.parametrize("method,args,kwargs", OUT_OF_RANGE_CALLS, ids=[c[0] for c in OUT_OF_RANGE_CALLS])
def test_unrepresentable_arguments_give_einval(system, method, args, kwargs) -> None:
    import errno

    with system.create_vm(0) as vm:
        with pytest.raises(OSError) as exc:
            getattr(vm, method)(*args, **kwargs)
        assert exc.value.errno == errno.EINVAL


def test_negative_size_wraps_and_reaches_the_size_check(system) -> None:
    import errno

    with system.create_vm(0) as vm:
        with pytest.raises(OSError) as exc:
            vm.create_guest_memfd(-4096)
        assert exc.value.errno == errno.EINVAL
        gmem = vm.create_guest_memfd(4096)
        with pytest.raises(OSError) as exc:
            gmem.fallocate(0x3, 0, 1 << 64)
        assert exc.value.errno == errno.EINVAL
        gmem.close()
