"""Output head + cross-entropy over the target positions only, chunk by chunk.

The plain path computes logits for every position, (B, T, V), upcasts them to float32 and keeps them
(and their gradient) alive through backward: at vocabulary 128k and 8k tokens that is 4 GiB each. Here:

1. only positions whose next token is a target are gathered (prompt tokens never reach the head);
2. logits are computed ``chunk`` rows at a time, in float32 for the log-softmax;
3. the gradient with respect to the hidden states is computed in the forward pass itself
   (softmax - one_hot) @ W, so no logits are kept for backward: memory is O(chunk x V + N x H).

The head weight must be frozen (it is: LoRA never trains it unless `lm_head` is a target, in which case
the plain path is used). Gemma-2's final logit soft-capping is supported.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100  # labels not trained on: data.IGNORE_INDEX, also torch's cross_entropy default


class _FusedLinearTokenNLL(torch.autograd.Function):
    """hidden (N, H), weight (V, H), labels (N,) all valid targets -> (N,) float32 next-token NLL per position.

    Logits are computed ``chunk`` rows at a time in float32 and dropped; the gradient with respect to the hidden
    states, (softmax - one_hot) @ W per row, is computed in the forward pass, so backward only scales each row by
    its position's incoming gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        softcap: float | None,
        chunk: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        w = weight.to(dtype)
        nll = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if hidden.requires_grad else None
        buffer = _logits_buffer(min(chunk, hidden.shape[0]), w.shape[0], hidden)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            y = labels[start : start + chunk]
            if buffer is None:
                logits = (h @ w.T).float()
            elif dtype == torch.float32:
                logits = torch.mm(h, w.T, out=buffer[: h.shape[0]])
            else:
                logits = buffer[: h.shape[0]].copy_(h @ w.T)
            if softcap is not None:
                t = torch.tanh(logits / softcap)
                logits = t * softcap
            # log-softmax in place: nll = max + log(sum(exp(logits - max))) - logit of the target
            target = logits.gather(1, y[:, None])
            top = logits.amax(1, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(1, keepdim=True)
            nll[start : start + chunk] = (top + total.log() - target)[:, 0]
            if grad_hidden is not None:
                grad = probs.div_(total)  # softmax
                grad[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                if softcap is not None:
                    grad *= 1.0 - t * t
                torch.mm(grad.to(dtype), w, out=grad_hidden[start : start + chunk])
            del logits, probs
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        return nll

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor) -> tuple:
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None, None, None
        grad = (grad_hidden * grad_nll[:, None].to(grad_hidden.dtype)).to(ctx.hidden_dtype)
        return grad, None, None, None, None, None


_buffer: list[torch.Tensor] = []  # the last CPU logits buffer, reused by the next call of the same size or less


def _logits_buffer(rows: int, vocab: int, hidden: torch.Tensor) -> torch.Tensor | None:
    """A (rows, vocab) float32 buffer for one chunk of logits on a CPU, kept from call to call: a fresh one is
    new memory the kernel must map page by page at every step (on some machines a tenth of a CPU step). None on
    other devices (their caching allocators reuse memory already) and for tensor subclasses (the memory plan's
    fake tensors)."""
    if hidden.device.type != "cpu" or type(hidden) is not torch.Tensor:
        return None
    if _buffer and _buffer[0].shape[1] == vocab and _buffer[0].shape[0] >= rows:
        return _buffer[0]
    _buffer[:] = [torch.empty(rows, vocab, dtype=torch.float32)]
    return _buffer[0]


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None = None,
    chunk: int = 1024,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy, number of targets) from final hidden states.

    hidden: (B, T, H) after the final norm; weight: (V, H) the frozen output head; labels: (B, T) with
    IGNORE_INDEX where no loss is taken. Position t predicts label t+1, as in ``loss.loss_sum``.
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    h = hidden[:, :-1][mask]  # (N, H): only positions that predict a target
    y = shift_labels[mask]
    if dtype is None:
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
    if h.shape[0] == 0:
        return hidden.sum() * 0.0, 0
    return _FusedLinearTokenNLL.apply(h, weight, y, softcap, chunk, dtype).sum(), int(y.shape[0])


def fused_linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None = None,
    chunk: int = 1024,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(B, T-1) float32 log-probabilities of each next-token target (0 where the label is IGNORE_INDEX), from
    final hidden states, without building (B, T, V) logits; differentiable with respect to ``hidden``."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    h = hidden[:, :-1][mask]
    y = shift_labels[mask]
    if dtype is None:
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
    out = hidden.new_zeros(shift_labels.shape, dtype=torch.float32)
    if h.shape[0] == 0:
        return out + hidden.sum() * 0.0
    return out.masked_scatter(mask, -_FusedLinearTokenNLL.apply(h, weight, y, softcap, chunk, dtype))
