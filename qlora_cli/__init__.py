"""qlora: fine-tune causal language models with LoRA on a 4-bit quantized base."""

__version__ = "0.1.0"
