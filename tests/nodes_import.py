"""Find a node class of the pack imported as ComfyUI imports it."""


def node_class(pack, name):
    import importlib
    nodes = importlib.import_module(pack.__name__ + ".nodes")
    return nodes.NODE_CLASS_MAPPINGS[name]
