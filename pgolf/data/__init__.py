"""Data phase: corpus, tokenizer, shards, bytes-per-token tables, the training loader."""
