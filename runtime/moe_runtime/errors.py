"""Domain exceptions of the runtime, raised where the problem is found.

Only `servicers.py` maps them to gRPC status codes; the CLI prints them. Nothing here imports torch.
"""


class RuntimeErrorBase(Exception):
    """Base of every error the runtime reports to a caller."""


class InvalidRequest(RuntimeErrorBase, ValueError):
    """The caller sent something the model cannot serve (empty prompt, bad parameter, too long)."""


class CapacityExceeded(RuntimeErrorBase):
    """The server is full (queue or batch limits): retry later."""


class ModelNotReady(RuntimeErrorBase):
    """Weights are not loaded or warm-up has not passed yet."""


class CheckpointError(RuntimeErrorBase, ValueError):
    """A checkpoint directory is missing, corrupt or does not match its config; names file and tensor."""


class ConfigError(RuntimeErrorBase, ValueError):
    """A runtime configuration value is invalid; the message names the field."""
