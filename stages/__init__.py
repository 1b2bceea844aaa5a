"""Stage entry points: `python -m stages.<name>` (one thin module per DVC stage)."""
