"""What every quantized linear shares: the forward dispatch (reference or kernel), bias, sizes, `effective_weight`.

A quantized linear replaces an `nn.Linear` [out, in] in place. Its state_dict holds only the packed integer/float8
tensors and their scales (plus the bias, if any), so the bytes it reports are the bytes it occupies.
Two forwards compute the same function:
- `forward_reference`: dequantise the whole weight to the activation dtype, then `F.linear` — the definition.
- `forward_kernel`: a fused low-bit matmul where this device has one (subclasses say which); tests check that it
  agrees with the reference.
`impl` picks one: "auto" (kernel when `kernel_available(x)` and x needs no gradient, else reference), "reference"
or "kernel". Gradients flow to the input through the reference path (frozen quantized base + adapters, QLoRA-style).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Impl = Literal["auto", "reference", "kernel"]


class QuantizationError(ValueError):
    """A layer that cannot be quantized as asked, or a quantized checkpoint that does not fit: names the layer."""


class QuantizedLinear(nn.Module):
    """Base class. Subclasses register their packed buffers and implement `dequantize`, `kernel_available`,
    `forward_kernel`; `scheme` names the format ("int8", "int4", "fp8")."""

    scheme = ""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype  # the float dtype the layer computes in (the weight dtype it replaced)
        self.impl: Impl = "auto"
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    # ----------------------------------------------------------------- subclass interface
    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight [out, in] in `dtype` (computed in float32, then cast)."""
        raise NotImplementedError

    def kernel_available(self, x: torch.Tensor) -> bool:
        raise NotImplementedError

    def forward_kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d: [N, in] -> [N, out] without the bias."""
        raise NotImplementedError

    # ----------------------------------------------------------------- shared
    def effective_weight(self) -> torch.Tensor:
        """Dense [out, in] weight in the layer's compute dtype; absorbed MLA folds kv_b_proj's with it
        (dsv3.layers.linear_weight), as DeepSeek's inference code dequantises wkv_b for the absorbed form."""
        return self.dequantize(self.dtype)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        impl = self.impl
        if impl == "auto":  # the fused ops have no backward: inputs that need a gradient take the reference path
            wants_grad = x.requires_grad and torch.is_grad_enabled()
            impl = "kernel" if self.kernel_available(x) and not wants_grad else "reference"
        if impl == "reference":
            return self.forward_reference(x)
        if not self.kernel_available(x):
            raise QuantizationError(f"{type(self).__name__}[{self.out_features}x{self.in_features}]: no fused "
                                    f"kernel for {x.dtype} input on {x.device.type}; use impl='reference' or 'auto'")
        y = self.forward_kernel(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the packed tensors; a dtype change (`model.to(torch.bfloat16)`) reaches only the compute
        dtype and the bias — float8 weights and bf16 int4 scales keep their format."""
        formats = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, dtype in formats.items():
            if self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self

    def nbytes(self) -> int:
        """Bytes of the layer's tensors as stored (packed weights + scales + bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"dtype={self.dtype}, impl={self.impl}")
