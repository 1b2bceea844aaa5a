"""Error types that stages turn into one clear line and a non-zero exit."""


class PgolfError(Exception):
    """An expected failure (bad input, bad params, over-limit artifact).

    Stage entry points print ``error: <message>`` and exit 1 instead of a
    traceback, so the message must name the file or key and what is wrong.
    """


class ParamError(PgolfError):
    """A params.yaml value is missing, unknown, mistyped or out of range."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"params.yaml: {key}: {message}")


class DataError(PgolfError):
    """An input file is missing, corrupt or inconsistent."""
