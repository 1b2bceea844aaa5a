"""The model: config, GPT, attention, embeddings, RoPE, the block-matrix layout, checkpoints."""
