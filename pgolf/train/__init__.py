"""Training: the loop, optimizers (Muon, AdamW), schedules, averaging, weight choice, resume state, logging."""
