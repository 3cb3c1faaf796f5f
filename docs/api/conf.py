"""Sphinx configuration for guestmem's API reference (built from the docstrings).

Build: ``python -m sphinx -W -b html docs/api docs/api/_build`` (CI does, warnings are errors).
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src")))

project = "guestmem"
extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
nitpicky = False
# kvm.Vm, model.Vm and interface.Vm share their name by design (one interface, two backends), so
# type-hint cross-references are ambiguous; the page of each class is still linked from its section.
suppress_warnings = ["ref.python"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
