"""How CSM's linear layers are stored and run on each device, swapped in from outside the model
code (as gpt-fast's quantize.py does): the model keeps plain nn.Linear, and `quantize` replaces
them after loading.

Schemes (config.QUANTIZE_SCHEMES), with the kernels the ecosystem already has:
  none  CPU: fp32 weights pre-packed for oneDNN (`CpuLinear`). CUDA: the model's dtype as is.
  bf16  CPU: bf16 weights pre-packed for oneDNN, fp32 everywhere else (KV caches, norms, sampling).
  int8  CPU: int8 weights per output channel and int8 activations per row (fbgemm; VNNI where the
        CPU has it) (`Int8Linear`), and the embedding tables as int8 rows (`Int8Embedding`).
        CUDA: int8 weights per channel, bf16 activations (torchao).
  fp8   CUDA only: fp8 e4m3 weights per channel and activations per row (torchao; H100/H200).

Activations are scaled per row, never per tensor, so a request's codes do not depend on the
other requests in its batch: batched equals alone, as in every other scheme.

Kept in the model's dtype whatever the scheme: the codebook-0 head (`KEPT`: its logits are sampled
directly), the depth decoder's per-codebook heads (a parameter sliced per step, not a layer), the
norms and the KV caches. bench/fidelity.py measures what the rest costs.

Under torch.compile a packed weight cannot enter the graph (fbgemm's is a TorchScript object,
oneDNN's an opaque tensor), so the graph calls `csm::packed_linear`, a custom op that names the
layer by a number; eager calls skip the op's dispatch.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .config import DEVICE_SCHEMES

KEPT = ("codebook0_head",)  # linear layers kept in the model's dtype
MIN_WEIGHT_ELEMENTS = 1 << 20  # smaller matrices keep nn.Linear on the CPU: a packed kernel's ~20 us a call outweighs its gain
SCALE_SUFFIX = "weight_scale"  # an int8 layer's per-channel scales, beside its int8 `weight`

# fbgemm multiplies uint8 activations by int8 weights. Without VNNI its kernel adds pairs of
# products in int16, which full 8-bit activations can overflow (255 * 127 * 2 > 32767): those CPUs
# get 7-bit activations, as fbgemm's own `reduce_range` does.
ACTIVATION_LEVELS = 127 if torch._C._cpu._is_avx512_vnni_supported() else 63

_LAYERS: weakref.WeakValueDictionary[int, PackedLinear] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("csm::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """The packed layer `handle`'s kernel on x [..., in] -> [..., out_features], as a graph sees it."""
    return _LAYERS[handle].kernel(x)


@packed_linear.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """A bias-free linear layer whose weight a CPU kernel has packed in its own layout. Inference
    only; `kernel` is the packed matmul."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.handle = next(_HANDLES)
        _LAYERS[self.handle] = self

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of the packed weight."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(x, self.handle, self.out_features)
        return self.kernel(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class CpuLinear(PackedLinear):
    """The weight pre-packed once in oneDNN's blocked layout, in fp32 or bf16 (then the input is
    cast to bf16 and the output back). MKL's GEMM is compute-bound at the few rows of a decode
    step (3-4x slower at 8 rows than at 1 on this project's machines); the packed oneDNN kernel
    stays near the memory-bandwidth floor there and is faster for prefill's many rows too. The
    packed weight is not a parameter: the swapped model's state_dict no longer holds it."""

    PACKED_FOR_ROWS = 8  # oneDNN's layout hint; measured best from 1 to 512 rows

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        super().__init__(weight.shape[0])
        self.dtype = dtype or weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(self.dtype).contiguous(), self.PACKED_FOR_ROWS)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, None, "none", [], "")
        return out.to(x.dtype)

    def nbytes(self) -> int:
        return self.packed.numel() * self.dtype.itemsize


def int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (int8 weight [out, in], fp32 scale [out]). A channel's
    own scale keeps one large channel from flattening all the others."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(PackedLinear):
    """int8 weights per output channel, packed for fbgemm, and int8 activations per row: each row
    is scaled to +-ACTIVATION_LEVELS, multiplied in integers (exact, whatever the batch), and
    scaled back. Its state holds the int8 `weight` and its `weight_scale` (what `python -m export
    quantize` writes); made empty, it packs them when a state dict is loaded into it."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__(out_features)
        self.in_features = in_features
        self.packed = None

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Linear:
        layer = cls(*weight.shape)
        layer.pack(*int8_weight(weight))
        return layer

    def pack(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        zero = torch.zeros(len(scale), dtype=torch.long)
        quantized = torch._make_per_channel_quantized_tensor(weight.contiguous(), scale.double(), zero, 0)
        self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def nbytes(self) -> int:
        return self.out_features * (self.in_features + 4)  # int8 weights and an fp32 scale a channel

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, 1.0, ACTIVATION_LEVELS + 1, self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.float()
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / ACTIVATION_LEVELS
        return (self.matmul(rows / scale) * scale).to(x.dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.packed is None:  # on the meta device: the shapes a checkpoint must have
            weight = torch.empty(self.out_features, self.in_features, dtype=torch.int8, device="meta")
            scale = torch.empty(self.out_features, device="meta")
        else:
            quantized, _ = torch.ops.quantized.linear_unpack(self.packed)
            weight, scale = quantized.int_repr(), quantized.q_per_channel_scales().float()
        destination[prefix + "weight"] = weight
        destination[prefix + SCALE_SUFFIX] = scale

    def _load_from_state_dict(self, state: dict, prefix: str, metadata, strict, missing: list, unexpected: list, errors: list) -> None:
        keys = (prefix + "weight", prefix + SCALE_SUFFIX)
        missing += [key for key in keys if key not in state]
        if any(key not in state for key in keys):
            return
        weight, scale = (state[key] for key in keys)
        if weight.dtype != torch.int8 or weight.shape != (self.out_features, self.in_features) or scale.shape != (self.out_features,):
            errors.append(
                f"{prefix}weight: expected int8 [{self.out_features}, {self.in_features}] and a scale [{self.out_features}], "
                f"got {weight.dtype} {list(weight.shape)} and {list(scale.shape)}"
            )
            return
        self.pack(weight, scale)


class Int8Embedding(nn.Module):
    """An embedding table as int8 rows, each with its scale; a lookup scales back only the rows it
    reads. A frame reads a few rows, so this saves memory (a quarter of fp32's), not time: the text
    and codebook tables are a quarter of the 1B model's weights."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer(SCALE_SUFFIX, torch.empty(num_embeddings))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Embedding:
        layer = cls(*weight.shape).to(weight.dtype)
        layer.weight, scale = int8_weight(weight)
        setattr(layer, SCALE_SUFFIX, scale.to(weight.dtype))
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scale = getattr(self, SCALE_SUFFIX)
        return self.weight[ids].to(scale.dtype) * scale[ids].unsqueeze(-1)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's weights as stored: parameters, persistent buffers (not the KV caches)
    and packed layers."""
    total = 0
    for part in module.modules():
        tensors = [*part._parameters.values(), *(b for n, b in part._buffers.items() if n not in part._non_persistent_buffers_set)]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        total += part.nbytes() if isinstance(part, PackedLinear) else 0
    return total


def modules_of(model: nn.Module, kind: type[nn.Module]) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(qualified name, parent, name, module) of every module of exactly `kind`."""
    for module_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                yield f"{module_name}.{name}" if module_name else name, parent, name, child


def linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """(qualified name, parent, name, layer) of every bias-free nn.Linear."""
    return ((qualified, parent, name, layer) for qualified, parent, name, layer in modules_of(model, nn.Linear) if layer.bias is None)


INT8_LAYERS = {nn.Linear: Int8Linear, nn.Embedding: Int8Embedding}  # what the int8 scheme puts in each one's place


def int8_targets(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, module) of every module the int8 scheme replaces: the bias-free linear layers
    not in KEPT, and the embedding tables."""
    for qualified, parent, name, layer in linear_layers(model):
        if qualified not in KEPT:
            yield parent, name, layer
    for _, parent, name, table in modules_of(model, nn.Embedding):
        yield parent, name, table


def check_scheme(scheme: str, device: torch.device) -> None:
    """Raise a ValueError naming `quantize` for a scheme this device has no kernels for."""
    allowed = DEVICE_SCHEMES.get(device.type, ("none",))
    if scheme not in allowed:
        raise ValueError(f"quantize: {scheme!r} is not available on {device.type}; choose one of {', '.join(allowed)}")


def quantize(model: nn.Module, scheme: str, device: torch.device, min_weight_elements: int = MIN_WEIGHT_ELEMENTS) -> None:
    """Swap the model's linear layers for `scheme`'s on `device` (in place; inference only). A
    scheme changes every layer not in KEPT, whatever its size; the layers it leaves in fp32 are
    packed for oneDNN from `min_weight_elements` weights up."""
    check_scheme(scheme, device)
    if device.type == "cuda":
        if scheme != "none":
            _quantize_cuda(model, scheme)
        return
    if not torch.backends.mkldnn.is_available():
        return
    if scheme == "int8":
        for parent, name, module in int8_targets(model):
            setattr(parent, name, INT8_LAYERS[type(module)].from_float(module.weight.detach()))
    for qualified, parent, name, layer in linear_layers(model):  # those int8 left, or all
        if scheme == "bf16" and qualified not in KEPT:
            setattr(parent, name, CpuLinear(layer.weight, torch.bfloat16))
        elif layer.weight.numel() >= min_weight_elements:
            setattr(parent, name, CpuLinear(layer.weight))


def _quantize_cuda(model: nn.Module, scheme: str) -> None:
    """torchao's tensor subclasses, which torch.compile lowers into the captured frame step."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow, quantize_

    chosen = {id(layer) for qualified, _, _, layer in linear_layers(model) if qualified not in KEPT}
    config = Int8WeightOnlyConfig() if scheme == "int8" else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantize_(model, config, filter_fn=lambda module, _: id(module) in chosen)


def empty_int8_layers(model: nn.Module) -> None:
    """Ready a model built on the meta device to load an int8 checkpoint: each module int8 replaces
    becomes an empty `Int8Linear` (which packs its tensors as they load) or `Int8Embedding`."""
    for parent, name, module in int8_targets(model):
        setattr(parent, name, INT8_LAYERS[type(module)](*module.weight.shape))
