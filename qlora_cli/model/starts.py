"""Where an adapter starts (``init_lora_weights``): PEFT's initialisations, on a 4-bit base as loaded.

    default   A Kaiming-uniform, B = 0: a fresh adapter changes nothing (``LoRALinear.reset_lora_parameters``)
    gaussian  A ~ N(0, 1/r²), B = 0 (also there)
    loftq     s·BA = the best rank-r approximation of the quantization error W − Q(W), where W is the base's
              original 16-bit weight and Q(W) the NF4 weight the run trains on: Q(W) + s·BA is closer to W
              than Q(W) alone. The base is left as it is, so the adapter is a plain LoRA (PEFT's
              ``replace_lora_weights_loftq``; PEFT leaves out the scaling s there, qlora divides by it, so
              both agree at lora_alpha = lora_r and only qlora's start is LoftQ's at any other alpha).
    pissa     A, B from the top r singular directions of the base weight, split evenly and divided by s
              (``pissa_niter_N``: torch's randomized ``svd_lowrank`` with N iterations);
    olora     A, B from the first r directions of its QR decomposition.

PiSSA and OLoRA start with s·B₀A₀ ≠ 0, so PEFT takes s·B₀A₀ off the base weight (and re-quantizes a 4-bit one,
adding a second quantization error). qlora keeps the 4-bit base as loaded and takes s·B₀A₀ off through a frozen
copy of the start (``LoRALinear.offset``): the model is ``Q − s·B₀A₀ + s·BA``, which starts exactly at the base.
The adapter is saved in PEFT's converted form (``lora.adapter_state_dict``): a plain LoRA of rank 2r on the
unchanged base, which PEFT, vLLM, ``merge``, ``export`` and ``serve`` load as they are.

The starts are computed from the weight the layer computes with (a 4-bit one dequantized), in float32, on
the layer's device; every process computes the same start from the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qlora_cli.config import LoRASettings, ModelSettings
from qlora_cli.errors import ModelError
from qlora_cli.kernels.lora_linear import dense_weight
from qlora_cli.model.lora import lora_layers

OriginalWeights = Callable[[str, tuple[int, ...]], torch.Tensor]  # (module name, (out, in)) -> W as stored, float32


def pissa_start(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[torch.Tensor, ...]:
    """PiSSA's (A (r, in), B (out, r)) of ``weight`` (out, in), float32: ``s·BA`` is its best rank-r part.
    ``niter``: torch's randomized ``svd_lowrank`` (draws from torch's generator) instead of the full SVD."""
    weight = weight.float()
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(weight, r, niter=niter)
        vh = v.t()
    root = torch.sqrt(s / scaling)
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()


def olora_start(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, ...]:
    """OLoRA's (A (r, in), B (out, r)) of ``weight`` (out, in): the first r columns of Q and rows of R, W = QR."""
    q, rr = torch.linalg.qr(weight.float())
    return rr[:r].contiguous(), q[:, :r].contiguous()


def loftq_start(original: torch.Tensor, quantized: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, ...]:
    """LoftQ's (A (r, in), B (out, r)) for a fixed quantized weight: ``s·BA`` is the best rank-r approximation of
    ``original − quantized`` (both (out, in)), its singular values split evenly between A and B."""
    u, s, vh = torch.linalg.svd(original.float() - quantized.float(), full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root[None, :]).contiguous()


def start_niter(init: str) -> int | None:
    """N of ``pissa_niter_N``; None for the full SVD."""
    return int(init.rsplit("_", 1)[1]) if init.startswith("pissa_niter_") else None


@torch.no_grad()
def apply_start(model: nn.Module, settings: LoRASettings, originals: OriginalWeights | None = None) -> None:
    """Set every LoRA layer's start for ``settings.init`` (after ``inject_lora``); default and gaussian are set
    there already. ``originals`` reads the base's 16-bit weights (LoftQ; ``original_weights``)."""
    init = settings.init
    if init in ("default", "gaussian"):
        return
    for name, layer in lora_layers(model):
        if layer.lora_A.weight.device.type == "meta":  # the memory plan's model: nothing to start from
            continue
        weight = dense_weight(layer.base, torch.float32).clone()  # (out, in); a 4-bit weight dequantized
        if init == "loftq":
            if originals is None:
                raise ModelError("init_lora_weights: loftq needs the base's original weights")
            original = oriented(originals(name, weight.shape), weight)
            lora_A, lora_B = loftq_start(original, weight, layer.r, layer.scaling)
        elif init == "olora":
            lora_A, lora_B = olora_start(weight, layer.r)
        else:
            lora_A, lora_B = pissa_start(weight, layer.r, layer.scaling, start_niter(init))
        layer.lora_A.weight.copy_(lora_A)
        layer.lora_B.weight.copy_(lora_B)
        if settings.offset_start:
            layer.offset = (lora_A.clone(), lora_B.clone())


def oriented(original: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``original`` as (out, in) like the layer's ``weight``: GPT-2's Conv1D files store (in, out), and a 4-bit
    layer is (out, in) whatever the file held, so a square weight takes the orientation nearer the layer's."""
    original = original.to(weight.device)
    if original.shape != weight.shape:
        return original.T.contiguous()
    if original.shape[0] == original.shape[1] and (original.T - weight).norm() < (original - weight).norm():
        return original.T.contiguous()
    return original


def original_weights(base: ModelSettings) -> OriginalWeights:
    """A reader of the base's original weights from its safetensors files (LoftQ's W): the model folder, the
    GGUF file's converted folder (its weights dequantized from the GGUF), or a hub model already in the local
    cache. ``ModelError`` names a weight the files do not hold or hold in another shape."""
    from safetensors import safe_open

    from qlora_cli.model.gguf import resolve_gguf
    from qlora_cli.model.loading import is_local

    name = resolve_gguf(base).base_model
    if is_local(name):
        folder = Path(name).expanduser()
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, allow_patterns=["*.safetensors"], local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached, offline, a bad id: one line
            raise ModelError(f"init_lora_weights: loftq cannot find the weights of {name} in the local cache") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(
            f"init_lora_weights: loftq reads the base's original weights from *.safetensors; {folder} has none"
        )
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                where.setdefault(key, path)

    def read(module: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = f"{module}.weight"
        if key not in where:
            raise ModelError(
                f"init_lora_weights: loftq found no weight {key!r} in {folder}'s safetensors files (its names differ "
                "from the model's modules); use pissa, olora or default"
            )
        with safe_open(str(where[key]), framework="pt") as f:
            weight = f.get_tensor(key).float()
        if tuple(weight.shape) not in (tuple(shape), tuple(shape)[::-1]):
            raise ModelError(
                f"init_lora_weights: loftq: {key} in {folder} has shape {tuple(weight.shape)}, not {shape}"
            )
        return weight.contiguous()

    return read
