"""comfyui-sundae: SUNDAE priors over VQ-GAN tokens for ComfyUI, as a library and a training CLI.

ComfyUI imports this folder as a package (under its absolute path) and reads
``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` / ``WEB_DIRECTORY``. Outside ComfyUI
(pip install, tests, ``sundae-train``) importing the package is cheap: the node classes, and
torch with them, load only when those names are first read.
"""

from __future__ import annotations

import sys
from typing import Any

__version__ = "0.1.0"

# node docs served by ComfyUI at /extensions/<folder>/docs/<NodeId>/en.md (what the frontend asks
# for first, by locale) and docs/<NodeId>.md (its fallback for other locales): web/docs/
WEB_DIRECTORY = "./web"

_NODE_NAMES = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")


def __getattr__(name: str) -> Any:
    if name in _NODE_NAMES:
        from . import nodes

        value = getattr(nodes, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "folder_paths" in sys.modules:  # running inside ComfyUI: register folders and nodes now
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
