"""Errors the platform raises on bad input: each message names the file, field or value at fault.

The CLI prints them as one line and exits non-zero; the HTTP API maps them to 4xx answers.
"""


class MobileVLAError(Exception):
    """Base class: a problem the user can fix (bad config, bad data file, bad model file, ...)."""


class ConfigError(MobileVLAError):
    """A config file or override is invalid."""


class DataError(MobileVLAError):
    """A data file or folder is invalid (missing key, bad shape or dtype, NaN/inf, truncated file)."""


class ModelError(MobileVLAError):
    """A model, checkpoint or exported artifact is missing, corrupt or does not match its contract."""


class ResourceError(MobileVLAError):
    """The cluster cannot ever provide what was asked (workers, GPUs), or a service is unreachable."""
