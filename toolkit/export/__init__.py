"""Export: the deploy model to ONNX (fp32 and reduced precision), and the tie-aware verify that proves the
ONNX graph computes what the torch model computes.

May import: ``models`` and the top-level helpers. Not ``runtime``, ``builders``, ``checks`` or ``tasks``
(verify runs ONNX Runtime directly, so that the check does not depend on the code it checks).
"""
