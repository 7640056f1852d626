"""Errors of the converters, each naming the file, tensor or option at fault."""

from mwjax.nn.config import ConfigError


class CheckpointError(ValueError):
    """A checkpoint cannot be read as the model its config describes."""


class MissingTensorError(CheckpointError, KeyError):
    """A tensor the model needs is not in the checkpoint."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0])


class ShapeMismatchError(CheckpointError):
    """A tensor's shape disagrees with the shape the config implies."""


class UnsupportedCheckpointError(CheckpointError):
    """The path is not a checkpoint format or architecture that mwjax reads."""


class InvalidConfigError(CheckpointError, ConfigError):
    """A checkpoint's configuration is malformed, out of range, or asks for what mwjax does not implement."""
