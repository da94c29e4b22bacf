"""ComfyUI nodes: thin wrappers around `locref_core`. The only code that may import the host."""

from . import fgdm_edit_nodes, fgdm_map_nodes, fgdm_nodes, layout_nodes, locref_nodes

_MODULES = (layout_nodes, locref_nodes, fgdm_nodes, fgdm_map_nodes, fgdm_edit_nodes)
NODE_CLASS_MAPPINGS = {k: v for m in _MODULES for k, v in m.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: v for m in _MODULES
                              for k, v in m.NODE_DISPLAY_NAME_MAPPINGS.items()}
