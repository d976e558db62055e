"""Sphinx configuration for the vfiouser_trio documentation.

Sphinx, because it is what the trio world documents itself with: trio, h11, outcome and
pytest-trio are all Sphinx sites, and ``sphinxcontrib-trio`` (trio's own extension) renders
async functions, async context managers and async iterators as such. The guide pages stay
Markdown (``myst-parser``); the API reference is generated from the docstrings by autodoc.

Build (warnings are errors, as in CI)::

    python -m pip install -e '.[docs]'
    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import vfiouser_trio

project = "vfiouser_trio"
author = "the vfiouser_trio authors"
copyright = "the vfiouser_trio authors"
release = version = vfiouser_trio.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinxcontrib_trio",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# Markdown: headings get anchors (``page.md#section`` links), ``:::`` fences for directives.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# The reference: members in source order, type hints in the description (not the signature,
# where they make long lines), one page per module from docs/api/.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
autosummary_generate = False


html_theme = "alabaster"
html_title = f"vfiouser_trio {release}"
