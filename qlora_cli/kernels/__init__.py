"""Fast paths for the training step. Each has a plain-PyTorch reference it is tested against:

lora_linear.fused_lora_linear   one autograd node for base(x) + scaling * B(A(x)), 4-bit weights
                                dequantized on the fly (forward and backward), only the input saved
cross_entropy.fused_linear_cross_entropy
                                output head + cross-entropy over target positions only, in chunks,
                                never materializing full-vocabulary float32 logits
"""
