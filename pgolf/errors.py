"""Error types that stages turn into one clear line and a non-zero exit."""


class PgolfError(Exception):
    """An expected failure (bad input, bad params, over-limit artifact).

    Stage entry points print ``error: <message>`` and exit 1 instead of a
    traceback, so the message must name the file or key and what is wrong.
    """


class ParamError(PgolfError):
    """A params.yaml value is missing, unknown, mistyped or out of range."""

    def __init__(self, key: str, message: str, file: str = "params.yaml"):
        self.key = key
        self.message = message
        # key "" : the message is about the file itself (missing, not YAML).
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


class DataError(PgolfError):
    """An input file is missing, corrupt or inconsistent."""
