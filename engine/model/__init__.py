"""The model: its config, the Llama-family modules, RoPE, attention, the checkpoint format, the
loader and the rank rule compressed folders are served by. Device-free: nothing here is CPU- or
GPU-specific (the CPU serving form is a module swap, `engine.model.cpu_serving`)."""
