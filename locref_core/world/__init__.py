"""The shapes world: a tiny text-to-image model in the host's own classes, trained here on the
synthetic shapes (`data.synthetic`), so that the pack's trainers, patch and selection can be
measured against the papers' claims on a CPU (`benchmarks/shapes_world.py`).

Scaffolding for that experiment only: the nodes never import it. Like `train/`, it drives the
host as a library through `train.host.load_host`.
"""
