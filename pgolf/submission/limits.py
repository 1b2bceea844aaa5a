"""The challenge's limits (docs/RECIPE.md §3.6, §4.7): one home, imported by the gates and the driver."""

LIMIT_BYTES = 16_000_000        # code + compressed model, decimal bytes (exactly 16,000,000 fits)
TRAIN_BUDGET_SECONDS = 600.0    # training and everything after it that touches training data
EVAL_BUDGET_SECONDS = 600.0     # every evaluation pass
RECORD_GPUS = 8                 # the challenge's hardware: 8 GPUs of one host
