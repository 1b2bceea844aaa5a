"""The challenge's limits (docs/RECIPE.md §3.6, §4.7): one home, imported by the gates and the driver."""

LIMIT_BYTES = 16_000_000        # code + compressed model, decimal bytes (exactly 16,000,000 fits)
TRAIN_BUDGET_SECONDS = 600.0    # training and everything after it that touches training data
EVAL_BUDGET_SECONDS = 600.0     # every evaluation pass
RECORD_GPUS = 8                 # the challenge's hardware: 8 GPUs of one host


def reserved_code_bytes(code_bytes: int, quantum: int) -> int:
    """What the quantize fit sets aside for the code: ``code_bytes`` rounded up to a multiple of ``quantum``.

    An eval-only params edit changes the bundle (it embeds every param) by a few bytes; the reserve
    moves only when the size crosses a multiple of ``quantum``, so such an edit leaves quantize's
    input, hence the artifact, unchanged. size_check still adds the exact bytes.
    """
    return -(-code_bytes // quantum) * quantum
