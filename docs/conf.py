"""Sphinx configuration of the torchjd-golden documentation."""

from __future__ import annotations

import torchjd_golden

project = "torchjd-golden"
author = "torchjd-golden developers"
copyright = author  # the footer says "Copyright © torchjd-golden developers"
release = version = torchjd_golden.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    # MathJax from the site's own _static/ folder, not a CDN: the maths renders offline.
    "sphinx-mathjax-offline",
]
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "torchjd-golden"
html_static_path = ["_static"]

autodoc_default_options = {"members": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_inherit_docstrings = False
# Private base classes of torchjd and of this package that the signatures mention.
nitpicky = False
suppress_warnings = ["config.cache"]

# Docstring examples use their module's names, which pytest's doctests see as globals.
doctest_global_setup = """
import torch
from torchjd_golden import *
torch.manual_seed(0)
"""
