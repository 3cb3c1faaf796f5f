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
