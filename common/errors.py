"""Error types that say what was wrong and where, so the CLI and the API can report them without a traceback."""
from __future__ import annotations


class FedxrayError(Exception):
    """Base class: its message is meant for the user and names the file (and line) at fault."""


class DataError(FedxrayError):
    """A data source is unusable as a whole: missing file, wrong CSV header, unknown label, empty split."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        self.path, self.line = path, line
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{message}")


class ImageError(FedxrayError):
    """One image cannot be used (corrupt, too small, unsupported DICOM...). Sources exclude it and go on."""

    def __init__(self, reason: str, *, path: str | None = None, too_large: bool = False,
                 code: str = "unusable_image"):
        self.reason, self.path, self.too_large, self.code = reason, path, too_large, code
        super().__init__(f"{path}: {reason}" if path else reason)


class BundleError(FedxrayError):
    """A model bundle is missing, tampered with, or of a schema this version cannot read."""


class ModelDiverged(FedxrayError):
    """A model's outputs are NaN/inf: its weights (or BatchNorm statistics) blew up in training or aggregation."""
