"""Checks: compare two engines detection by detection (``matching`` pairs detections, ``sides`` runs or reads
each side, ``report`` writes the verdict and the pictures, ``compare`` ties them together), the output
sentinels, validate (every stage against the previous one) and bisect (the first ONNX node that diverges).

May import: ``builders``, ``runtime``, ``export``, ``models`` and the top-level helpers. Not ``tasks``.
"""
