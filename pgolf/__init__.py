"""pgolf: a reproducible DVC pipeline for the OpenAI Parameter Golf challenge."""

__version__ = "0.1.0"
