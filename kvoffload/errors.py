"""User-facing errors.

Every error a user can cause (bad file, bad flag value, prompt too long) is a
:class:`KvoffloadError`; the CLI prints its message on one line and exits 2.
Anything else is a bug and keeps its traceback.
"""


class KvoffloadError(Exception):
    """Base class: the message names the problem in one line."""


class ConfigError(KvoffloadError, ValueError):
    """An invalid configuration or sampling value."""


class ConfigTypeError(ConfigError, TypeError):
    """A configuration value of the wrong type (the message names the field and the type)."""


class ModelLoadError(KvoffloadError):
    """A model file or directory that cannot be read as a supported model."""


class InputError(KvoffloadError, ValueError):
    """A request that the loaded model cannot serve (e.g. prompt longer than its context)."""
