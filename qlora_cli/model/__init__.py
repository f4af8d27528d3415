"""The model: loading the base (folders, GGUF files) in NF4, qlora's LoRA layers and their injection, and the
adapter on disk in PEFT's format (``adapter_io``: the key mapping and fit check live there only)."""
