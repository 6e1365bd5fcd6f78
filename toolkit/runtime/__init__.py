"""Runtime: the binder (the engine's declared signature is the single source of truth for every tensor), the
``Engine`` protocol and :func:`toolkit.runtime.engine.load`, CUDA graphs, preprocessing, detections, sidecars
and ``backends/`` (one module per backend, picked by name through the registry in ``engine.py``).

May import: ``models`` (the eager torch backend builds a deploy model) and the
top-level helpers. Not ``builders``, ``checks`` or ``tasks``.
"""
