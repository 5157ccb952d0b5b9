"""What every quantized linear shares: the forward dispatch (reference or kernel), bias, sizes, `effective_weight`.

A quantized linear replaces an `nn.Linear` [out, in] in place. Its state_dict holds only the packed integer/float8
tensors and their scales (plus the bias, if any), so the bytes it reports are the bytes it occupies.
Two forwards compute the same function:
- `forward_reference`: dequantise the whole weight to the activation dtype, then `F.linear` — the definition.
- `forward_kernel`: a fused low-bit matmul where this device has one (subclasses say which); tests check that it
  agrees with the reference.
`impl` picks one: "auto", "reference" or "kernel". "auto" takes the kernel when the layer's device has one for its
compute dtype, x is in that dtype, needs no gradient and has at most `dense_above_rows` rows; with more rows it
dequantises the weight once and runs one dense matmul (`forward_dense`): a fused low-bit kernel made for decode
costs about a matvec per row on a CPU, so a 256-token prefill through it is tens of times slower than dense.
Gradients flow to the input through the reference path (frozen quantized base + adapters, QLoRA-style).

Where the kernel runs is decided once, when the layer is placed (`from_linear`, `.to(...)`, `load_state_dict`):
`_place()` asks `kernel_supported(device, dtype)` and lets the subclass lay out its tensors for that kernel
(`_prepare_kernel`), so the forward does no capability queries, layout conversions or scale casts per call.
"""

from __future__ import annotations

import sys
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

Impl = Literal["auto", "reference", "kernel"]
# CPU dense paths dequantise a large weight this many elements (4 MiB of float32) at a time, each slab multiplied
# while it is in cache. A whole-weight float32 temporary above glibc's 32 MiB mmap ceiling is mapped afresh at every
# call and its page faults cost more than the read: an fp8 2048x7168 layer at one row, 86 ms whole against 13 in
# 146-row slabs (AVX2 EPYC, one thread; 7168x2048: 89 against 12.9 in 512-row slabs, 1408x2048: 5.4 against 3.2;
# docs/results.md).
CPU_SLAB_ELEMENTS = 1 << 20


def cpu_capability() -> str:
    """torch's CPU kernel level, lower-case: "avx512", "avx2", "default" (ARM and others)... The fused low-bit
    matmuls and bf16 matmuls are vectorised differently per level, so their crossovers differ (DENSE_ABOVE_ROWS)."""
    return torch.backends.cpu.get_cpu_capability().lower()


def placement_entry(table: dict[str, int], device: torch.device, dtype: torch.dtype,
                    default: int = sys.maxsize) -> int:
    """The most specific entry of a DENSE_ABOVE_ROWS / DENSE_FIXED_WEIGHTS table for this placement."""
    keys = [device.type]
    if device.type == "cpu":
        level = f"cpu/{cpu_capability()}"
        keys = [f"{level}/{str(dtype).removeprefix('torch.')}", level, *keys]
    return next((table[k] for k in keys if k in table), default)


def slab_product(x: torch.Tensor, out_features: int, rows: int,
                 weight: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """x [..., in] @ Wᵀ -> [..., out] for a weight made (dequantised) `rows` output rows at a time, each slab
    multiplied while it is in cache (CPU_SLAB_ELEMENTS): weight(start, stop) -> W[start:stop], [stop - start, in].
    One call when rows >= out_features."""
    if rows >= out_features:
        return F.linear(x, weight(0, out_features))
    y = x.new_empty(*x.shape[:-1], out_features)
    for r in range(0, out_features, rows):
        y[..., r:r + rows] = F.linear(x, weight(r, min(r + rows, out_features)))
    return y


def linear_rows(linear: nn.Linear) -> torch.Tensor:
    """The weight to quantize, [out, in], stored row by row: a CPU decode may have stored it by columns
    (dsv3.fast.arrange), and packed tensors made from it element by element would keep those strides, which the
    kernels refuse (`_weight_int8pack_mm`: "expect B to be contiguous")."""
    return linear.weight.detach().contiguous()


class QuantizationError(ValueError):
    """A layer that cannot be quantized as asked, or a quantized checkpoint that does not fit: names the layer."""


class QuantizedLinear(nn.Module):
    """Base class. Subclasses register their packed buffers and implement `dequantize`, `kernel_supported`,
    `forward_kernel`; `scheme` names the format ("int8", "int4", "fp8")."""

    scheme = ""
    # Placement -> rows above which "auto" runs `forward_dense` rather than the kernel (absent: never). Keys, the
    # most specific first: "cpu/<capability>/<dtype>", "cpu/<capability>", the device type ("cpu", "cuda"), where
    # <capability> is torch's CPU kernel level (`cpu_capability`) and <dtype> the compute dtype ("bfloat16").
    # Subclasses set their measured crossovers (bench/quant.py prints kernel against dense path by rows).
    DENSE_ABOVE_ROWS: dict[str, int] = {}
    # The dense path's fixed cost per call (its unpacking and dequantising ops), in weights whose dequantising
    # costs as much: a layer of W weights switches above rows · (1 + fixed / W), so small layers switch later.
    # Same keys as DENSE_ABOVE_ROWS; absent: 0.
    DENSE_FIXED_WEIGHTS: dict[str, int] = {}

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype  # the float dtype the layer computes in (the weight dtype it replaced)
        self.impl: Impl = "auto"
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.kernel_ready = False  # set by _place(): the fused kernel runs here for `dtype` inputs
        self.dense_above_rows = sys.maxsize  # set by _place() from DENSE_ABOVE_ROWS for the layer's device
        self._dense: tuple | None = None  # (_packed_state(), dense weight) kept by effective_weight()

    # ----------------------------------------------------------------- subclass interface
    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight [out, in] in `dtype` (computed in float32, then cast)."""
        raise NotImplementedError

    def kernel_supported(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether `forward_kernel` runs for `dtype` inputs on `device` (asked once per placement)."""
        raise NotImplementedError

    def _prepare_kernel(self) -> None:
        """Lay the tensors out for the kernel on their (new) device; called by _place() when kernel_ready."""

    def forward_kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d: [N, in] in the layer's dtype -> [N, out] without the bias."""
        raise NotImplementedError

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows: dequantise once, one dense matmul (subclasses may fold scales in more cheaply)."""
        return self.forward_reference(x)

    # ----------------------------------------------------------------- shared
    def effective_weight(self) -> torch.Tensor:
        """Dense [out, in] weight in the layer's compute dtype; absorbed MLA folds kv_b_proj's with it
        (dsv3.layers.linear_weight), as DeepSeek's inference code dequantises wkv_b for the absorbed form.

        Kept once made, as vLLM keeps W_UK and W_UV dense after loading: absorbed decoding asks for it in every layer
        at every token, and dequantising cost more than the rest of the layer (int4 kv_b_proj on the bundled model:
        264 µs a layer against 30 for reading bf16's, 1.6 ms of a ~13 ms step; docs/results.md). The copy holds
        only the layers asked (kv_b_proj: 0.15% of V3's parameters) and is dropped when the layer is placed or
        reloaded, or its packed tensors are replaced or changed in place. Inside a compiled graph it is not kept:
        the graph dequantises (inductor fuses that into the consumer).
        """
        if torch.compiler.is_compiling():
            return self.dequantize(self.dtype)
        cached = self._dense
        if cached is not None and cached[0] == self._packed_state():
            return cached[1]
        dense = self.dequantize(self.dtype)
        self._dense = (self._packed_state(), dense)  # after: dequantize may change the layout (int4 on CUDA)
        return dense

    def _packed_state(self) -> tuple:
        """What the packed tensors are now (compute dtype, storage, in-place version): the key of `_dense`. Tensors
        made under torch.inference_mode() track no version, so for them only a new storage is seen."""
        return self.dtype, tuple((t.data_ptr(), None if t.is_inference() else t._version)
                                 for t in self._buffers.values() if t is not None)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        impl = self.impl
        if impl == "auto":  # the fused ops have no backward: inputs that need a gradient take the reference path
            if not self.kernel_ready or x.dtype != self.dtype or (x.requires_grad and torch.is_grad_enabled()):
                return self.forward_reference(x)
            if x.numel() > self.dense_above_rows * self.in_features:
                return self.forward_dense(x)
        elif impl == "reference":
            return self.forward_reference(x)
        elif not (self.kernel_ready and x.dtype == self.dtype):
            raise QuantizationError(f"{type(self).__name__}[{self.out_features}x{self.in_features}]: no fused "
                                    f"kernel for {x.dtype} input on {x.device.type} (layer dtype {self.dtype}); "
                                    "use impl='reference' or 'auto'")
        if x.dim() == 2:  # [N, in] as the MoE's experts take it: no reshape round trip (~1 us each on a CPU)
            y = self.forward_kernel(x)
        else:
            y = self.forward_kernel(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _place(self) -> None:
        """Decide, for the device the tensors are on now, whether the kernel runs and above how many rows the
        dense path takes over; lay the tensors out for the kernel. Called after every placement."""
        device = next(iter(self.buffers())).device
        self._dense = None
        self.kernel_ready = device.type != "meta" and self.kernel_supported(device, self.dtype)
        rows = placement_entry(self.DENSE_ABOVE_ROWS, device, self.dtype)
        fixed = placement_entry(self.DENSE_FIXED_WEIGHTS, device, self.dtype, default=0)
        self.dense_above_rows = rows + rows * fixed // (self.in_features * self.out_features)
        if self.kernel_ready:
            self._prepare_kernel()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._place()

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the packed tensors; a dtype change (`model.to(torch.bfloat16)`) reaches only the compute
        dtype and the bias — float8 weights and bf16 int4 scales keep their format."""
        formats = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, dtype in formats.items():
            if self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        self._place()
        return self

    def nbytes(self) -> int:
        """Bytes of the layer's tensors as stored (packed weights + scales + bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"dtype={self.dtype}, impl={self.impl}")
