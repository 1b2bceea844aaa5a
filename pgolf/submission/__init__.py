"""Submission: the size gate and the records-folder export."""
