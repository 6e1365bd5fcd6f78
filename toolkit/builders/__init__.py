"""Builders: compiled engines from an ONNX file or a deploy model (TensorRT, AOTInductor, Torch-TensorRT),
each written atomically with a sidecar that records its signature and how it was built.

``build.py`` holds :func:`build_engine` (the ONNX-input builders) and the helpers every builder shares; a new
builder is one module plus one entry in its registry.

May import: ``runtime``, ``export``, ``models`` and the top-level helpers. Not ``checks`` or ``tasks``.
"""
