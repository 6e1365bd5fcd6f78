"""Typed errors. Anything a user can cause raises one of these, never an ``assert``.

The CLI turns a :class:`ToolkitError` into one line and exit code 2 (usage or input error).
"""

from __future__ import annotations


class ToolkitError(Exception):
    """Base class for every error the toolkit raises on purpose."""


class ConfigError(ToolkitError):
    """Unknown config name, malformed config, or a checkpoint that does not fit its config."""


class CheckpointError(ToolkitError):
    """A checkpoint that is missing, unreadable, or whose weights do not fit the model."""


class ExportError(ToolkitError):
    """The ONNX export failed, or the exported file did not verify against torch."""


class SignatureError(ToolkitError):
    """A file whose I/O does not describe an engine the toolkit can run."""


class BindingError(ToolkitError):
    """A tensor does not match the engine's declared signature and cannot be converted losslessly."""


class EngineError(ToolkitError):
    """An engine could not be loaded or refused to run (not an engine, wrong GPU, wrong library...)."""


class MissingDependencyError(ToolkitError, ImportError):
    """An optional library is not installed; the message names the extra to install."""


class InputError(ToolkitError):
    """An input file (image, result file, directory) that cannot be used."""


class ComparisonError(ToolkitError):
    """Two backends disagree, a sentinel fired on one of them, or a validation stage broke."""


class IntegrityError(EngineError):
    """An artifact whose bytes are not the ones the toolkit wrote (size, sha256 or zip CRC differ)."""


class FoldError(ToolkitError):
    """Folding a model's constants (BatchNorm into its convolutions) gave non-finite weights or changed its outputs."""
