"""Error types that say what was wrong and where, so the CLI and the API can report them without a traceback.

Every FedxrayError also carries a `failure` from FAILURES, a fixed vocabulary: the message (with paths, file
names, CSV lines) is for whoever runs the command on their own machine; the code and its `check` are what a
hospital may tell the federation (client/boundary.py) without revealing anything about its patients.
"""
from __future__ import annotations

# code -> (what went wrong, what to check). Fixed text: nothing here may ever hold data-derived content.
FAILURES: dict[str, tuple[str, str]] = {
    "data-not-found": ("the hospital's data folder, or a file it needs, does not exist",
                       "node config data-path on the SuperNode"),
    "data-layout": ("the layout of the hospital's data folder was not recognised",
                    "node config data-path / source on the SuperNode"),
    "data-csv": ("the hospital's label CSV is unreadable, has an unexpected header or a malformed row",
                 "the label CSV in the hospital's data folder"),
    "data-labels": ("the hospital's labels do not fit the run (unknown label, bad value, or a finding the run "
                    "asks for that this source does not label)", "run config findings, and the hospital's label CSV"),
    "data-missing-images": ("images listed in the hospital's label CSV are missing on disk",
                            "the image folders in the hospital's data folder"),
    "data-too-small": ("too few usable images or patients for the hospital's own train/val/test split",
                       "the hospital's data, or run config data.max_samples / local split"),
    "data": ("the hospital's data cannot be used", "the hospital's data folder"),
    "run-config": ("the run config is invalid for this version of the app", "the run config keys named here"),
    "model": ("the model cannot be built or loaded as configured", "run config arch / weights / channels"),
    "model-diverged": ("local training diverged (NaN/inf outputs)", "run config train.lr / privacy.max_grad_norm"),
    "out-of-memory": ("the SuperNode ran out of memory", "run config train.batch_size / preprocess.image_size, or the node's memory"),
    "site-policy": ("the hospital's site policy file is missing or invalid, so the hospital refuses every run",
                    "the site policy file named by node config site-policy on the SuperNode"),
    "policy-refused": ("the hospital's site policy does not allow this run", "the rule named here against the run "
                                                                             "config"),
    "dp-budget-spent": ("the hospital's privacy budget would be exceeded by another round",
                        "run config privacy.target_epsilon / federation.rounds, or the hospital's site policy"),
    "internal": ("an unexpected error in the ClientApp", "the SuperNode's fedxray log (incident id)"),
}


class FedxrayError(Exception):
    """Base class: its message is meant for the user and names the file (and line) at fault."""

    failure = "internal"

    def __init__(self, *args, failure: str | None = None):
        super().__init__(*args)
        if failure is not None:
            if failure not in FAILURES:
                raise ValueError(f"unknown failure code {failure!r}")
            self.failure = failure


class DataError(FedxrayError):
    """A data source is unusable as a whole: missing file, wrong CSV header, unknown label, empty split."""

    failure = "data"

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 failure: str | None = None):
        self.path, self.line = path, line
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{message}", failure=failure)


class ImageError(FedxrayError):
    """One image cannot be used (corrupt, too small, unsupported DICOM...). Sources exclude it and go on.
    `code` is the image-level reason the inference API reports (corrupt, multi_frame, too_many_pixels...)."""

    failure = "data"

    def __init__(self, reason: str, *, path: str | None = None, too_large: bool = False,
                 code: str = "unusable_image"):
        self.reason, self.path, self.too_large, self.code = reason, path, too_large, code
        super().__init__(f"{path}: {reason}" if path else reason)


class SettingsError(FedxrayError):
    """Settings that do not validate; `keys` names the offending settings (and nothing else)."""

    failure = "run-config"

    def __init__(self, message: str, *, keys: list[str] = ()):
        self.keys = list(keys)
        super().__init__(message)


class BundleError(FedxrayError):
    """A model bundle is missing, tampered with, or of a schema this version cannot read."""

    failure = "model"


class ModelDiverged(FedxrayError):
    """A model's outputs are NaN/inf: its weights (or BatchNorm statistics) blew up in training or aggregation."""

    failure = "model-diverged"
