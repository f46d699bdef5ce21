"""The one error hierarchy of megedit: every message says what was expected and what was found."""


class MeGError(Exception):
    """Base class of every error megedit raises on purpose."""


class ConfigError(MeGError):
    """A setting has a value megedit cannot use."""


class ModelLoadError(MeGError):
    """A model or tokenizer could not be found or loaded."""


class UnsupportedArchitectureError(MeGError):
    """The model's `config.model_type` is not in the architecture table."""


class DataError(MeGError):
    """An edit file is malformed; the message names the file, the record and the field."""
