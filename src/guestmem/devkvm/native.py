"""Build the drop-in's native library: cffi embedding mode, the system C compiler, a cache.

The library is ``interpose.c`` (the libc wrappers) plus the code cffi generates to embed
the interpreter; its first call into Python starts the interpreter and imports
``guestmem.devkvm.server``. It is built at first use into ``$GUESTMEM_DEVKVM_CACHE`` (else
``$XDG_CACHE_HOME/guestmem/devkvm``), keyed by a hash of the C source, this file, the
interpreter and the compiler, so a fresh machine needs only a compiler and the Python
headers. ``Unavailable`` says what is missing.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from .. import buildcache

MODULE = "_guestmem_devkvm"

# The embedded interpreter's only job at start-up: find guestmem and hand every call to
# guestmem.devkvm.server. The launcher passes its own sys.path (an editable install is
# found through a .pth file, which the embedded interpreter would not process).
_INIT = r'''
import os, sys
for _p in reversed(os.environ.get("GUESTMEM_DEVKVM_SYSPATH", "").split(os.pathsep)):
    if _p and _p not in sys.path:
        sys.path.insert(0, _p)
from _guestmem_devkvm import ffi, lib
from guestmem.devkvm import server as _server
_server.attach(lib)

@ffi.def_extern()
def gm_open(path, flags):
    return _server.serve_open(ffi.string(path).decode("utf-8", "surrogateescape"), flags)

@ffi.def_extern()
def gm_call(op, fd, a, b, c, d, e):
    return _server.serve(op, fd, a, b, c, d, e)
'''

_CDEF_API = """
long gm_open(const char *path, int flags);
long gm_call(int op, int fd, unsigned long a, unsigned long b, unsigned long c, unsigned long d, unsigned long e);
"""
_CDEF_LIB = """
void gm_set_ready(void);
void gm_set_kick_fd(int fd);
void gm_set_owned(int fd, int value);
void gm_add_maps(int delta);
"""


class Unavailable(Exception):
    """The native library cannot be built here; the message says why."""


def cache_dir() -> Path:
    """``$GUESTMEM_DEVKVM_CACHE``, else ``$XDG_CACHE_HOME/guestmem/devkvm``."""
    return buildcache.cache_dir("devkvm", "GUESTMEM_DEVKVM_CACHE")


_compiler = buildcache.c_compiler


def library() -> Path:
    """The path of the built library (built now if needed). :raises Unavailable: why not."""
    try:
        import cffi
    except ImportError as exc:
        raise Unavailable("the drop-in needs cffi: pip install cffi") from exc
    cc = _compiler()
    if cc is None:
        raise Unavailable("no C compiler found (install gcc or set CC)")
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        raise Unavailable(f"Python headers missing ({include}/Python.h): install python3-dev")
    source = importlib.resources.files("guestmem.devkvm").joinpath("interpose.c").read_bytes()
    key = hashlib.sha256(b"\0".join([
        source, Path(__file__).read_bytes(), sys.version.encode(), sys.executable.encode(),
        cffi.__version__.encode(), cc.encode()])).hexdigest()[:16]
    out = cache_dir() / f"libguestmem_devkvm-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "interpose.c"
        src.write_bytes(source)
        ffi = cffi.FFI()
        ffi.embedding_api(_CDEF_API)
        ffi.cdef(_CDEF_LIB)
        ffi.embedding_init_code(_INIT)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        ffi.set_source(MODULE, _CDEF_LIB, sources=[str(src)],
                       extra_compile_args=["-O2"], extra_link_args=[f"-Wl,-rpath,{libdir}"] if libdir else [])
        env_cc = os.environ.get("CC")
        os.environ["CC"] = cc
        try:
            built = ffi.compile(tmpdir=tmp, target=f"{MODULE}.*", verbose=False)
        except Exception as exc:  # distutils/setuptools raise several kinds
            raise Unavailable(f"building the drop-in library with {cc} failed: {exc}") from exc
        finally:
            if env_cc is None:
                os.environ.pop("CC", None)
            else:
                os.environ["CC"] = env_cc
        tmp_out = out.parent / f".{out.name}.{os.getpid()}"
        shutil.copyfile(built, tmp_out)
        os.replace(tmp_out, out)  # atomic: a concurrent build sees none or a whole library
    return out
