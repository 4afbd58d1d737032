"""Errors cmc_kit raises on purpose: each message names the file or setting and the fix."""


class CmcKitError(Exception):
    """Base class: the CLI prints these as one line instead of a traceback."""


class ConfigError(CmcKitError, ValueError):
    """A setting is unknown, has the wrong type, or does not match a saved run."""


class DataError(CmcKitError):
    """A dataset file or folder is missing, unreadable or has the wrong format."""


class CredentialsError(CmcKitError):
    """Kaggle credentials are missing or invalid."""


class KaggleError(CmcKitError):
    """A wheel bundle or a kernel push cannot be made (pip failed, Kaggle refused a kernel)."""


class CheckpointError(CmcKitError):
    """A run directory or checkpoint cannot be used (mismatched config, corrupt files)."""


class TrainingError(CmcKitError):
    """Training cannot continue (e.g. too many consecutive non-finite losses)."""


class ProbeError(CmcKitError, ValueError):
    """Features or labels cannot be probed (wrong shape, non-finite, too few classes)."""


class ExportError(CmcKitError):
    """An exported model does not reproduce the run's encoder."""
