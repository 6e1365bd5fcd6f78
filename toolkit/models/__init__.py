"""Models: configs, loading (Hugging Face directories, weights files, users' modules), the deploy contract and
the official-checkpoint remap.

Everything here produces a :class:`toolkit.models.contract.DeployModel`: the torch module that every later stage
(export, builders, the eager backend) starts from.

May import: the top-level helpers (``errors``, ``atomic``, ``numerics``, ``signature``, ``dtypes``). Nothing in
``export``, ``runtime``, ``builders``, ``checks`` or ``tasks``.
"""
