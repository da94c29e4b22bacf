"""ComfyUI nodes: thin wrappers around `locref_core`. The only code that may import the host."""

from . import layout_nodes, locref_nodes

NODE_CLASS_MAPPINGS = {**layout_nodes.NODE_CLASS_MAPPINGS, **locref_nodes.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {
    **layout_nodes.NODE_DISPLAY_NAME_MAPPINGS,
    **locref_nodes.NODE_DISPLAY_NAME_MAPPINGS,
}
