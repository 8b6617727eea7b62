"""The batched engine behind `LLM`: sequences, the block manager and scheduler that own request
state, the paged KV cache, the runner (one forward per step, CUDA graphs), sampler and detokenizer."""
