"""ComfyUI nodes: thin wrappers around `locref_core`. The only code that may import the host."""

from .layout_nodes import NODE_CLASS_MAPPINGS as _LAYOUT_NODES
from .layout_nodes import NODE_DISPLAY_NAME_MAPPINGS as _LAYOUT_NAMES

NODE_CLASS_MAPPINGS = {**_LAYOUT_NODES}
NODE_DISPLAY_NAME_MAPPINGS = {**_LAYOUT_NAMES}
