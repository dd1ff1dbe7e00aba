"""The one exception type of util.checkpoint."""


class CheckpointError(ValueError):
    """A checkpoint file or directory is not what was expected; the message names the file and key."""
