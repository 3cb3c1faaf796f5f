"""The one way guestmem reports a kernel-facing failure: ``OSError(errno, message)``.

Python maps the errno to the OSError subclass (FileExistsError, PermissionError, ...),
so callers can catch by kind. The message is the strerror text followed by the argument
and the rule it broke.
"""

from __future__ import annotations

import os


def oserror(err: int, detail: str) -> OSError:
    """Build ``OSError(err, "<strerror>: <detail>")``; raise the result."""
    return OSError(err, f"{os.strerror(err)}: {detail}")


def refuse_copy(self: object, protocol: object = None) -> object:
    """``__reduce_ex__`` of objects that own a kernel resource (an fd, a mapping): copy.copy,
    copy.deepcopy and pickle raise TypeError, since a copy would outlive ``close()``."""
    raise TypeError(f"cannot copy or pickle {type(self).__name__}: it owns a file descriptor or mapping")
