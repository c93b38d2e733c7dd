"""The project's own exception types: each message says what was found, what was expected and the fix."""


class RetrainError(Exception):
    """Base class for user mistakes; the CLI prints the message alone instead of a traceback."""


class ConfigError(RetrainError):
    """A config value is missing, unknown or out of range."""


class DataError(RetrainError):
    """The image folder is missing, empty, inconsistent or holds bad files."""


class ArtifactError(RetrainError):
    """A saved file (checkpoint, weights, export) cannot be read or does not fit the model."""


class UnsafePickleError(ArtifactError):
    """A file needs unpickling arbitrary code and the user has not allowed it."""


class RegistryError(ArtifactError):
    """A registry name or version is unknown, or the registry cannot be written."""


class TrainingError(RetrainError):
    """Training produced nothing worth keeping: a loss that is not finite, or no training step at all."""


class DiskFullError(RetrainError):
    """A disk filled up while writing a checkpoint or a registry version; what was written before is intact."""
