"""INT4 weight-only, group-wise asymmetric (the tinygemm format of torchao's `Int4WeightOnlyConfig`).

For each output row n and each group g of `group_size` consecutive input columns (docs/eval-lora-quant.md §4.2):

    scale = (max - min) / 15,   zero = min + 8 · scale        (bf16; zero lives in the float domain)
    q = clamp(round((W - zero) / scale) + 8, 0, 15)           (unsigned 4-bit)
    W ≈ (q - 8) · scale + zero

State (the on-disk format too): `qweight` uint8 [out, in_padded/2], two values per byte, column 2j in the low
nibble and 2j+1 in the high one; `scales`, `zeros` bf16 [out, in_padded/group_size]. Bytes per weight:
0.5 + 4/group_size, i.e. 0.266 of bf16 at g128 (4.25 bits), 0.3125 at g32.
An input width that is not a multiple of group_size is zero-padded when asked (`pad=True`): the extra columns
hold zeros and are dropped by the reference path. The kernels need less (`kernel_width`): a width padded to a
multiple of 32 and a group size that divides it, so a placed layer keeps only that many columns, each group's
scale and zero repeated over its sub-groups (the same function), and pads x to match.

Kernel: `aten._weight_int4pack_mm_for_cpu` (CPU) and `aten._weight_int4pack_mm` (CUDA, sm80+, bf16 only) read the
weights from their own tiled layouts (`_convert_weight_to_int4pack[_for_cpu]`). When the layer is placed on such
a device, `qweight` is repacked in place into that layout and scale/zero are stacked into the [in_padded/G, out, 2]
tensor the kernels take, in the compute dtype, so memory stays 4.25 bits/weight; `state_dict()` and moving the
module (`.to`) see the portable layout again.
- CPU layout (aten/src/ATen/native/cpu/int4mm_kernel.cpp): blocks of B output rows (64 with AVX512, 32 with AVX2),
  each stored as [in, B/2] bytes, row j in the low nibble of byte j and row j + B/2 in the high one; a last,
  partial block pairs rows 2j (low) and 2j + 1 (high). `unpack_cpu_layout` inverts that with a few tensor ops; the
  repack checks the round trip exactly and otherwise leaves the layer without its dense path.
- CUDA layout: unpacked by running the kernel on rows of the identity with scale 1, zero 8 (exact: q <= 15).
Many rows on a CPU (above DENSE_ABOVE_ROWS, later for small layers: DENSE_FIXED_WEIGHTS): unpack + dequantise once
per call straight from the CPU layout, in slabs of whole layout blocks that stay in cache, one dense matmul each
(`forward_dense`).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .base import CPU_SLAB_ELEMENTS, QuantizationError, QuantizedLinear, linear_rows, slab_product

GROUP_SIZES = (32, 64, 128, 256)
_UNPACK_CHUNK = 1024  # identity rows per kernel call when unpacking


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: [out, in] with in % group_size == 0 -> (q uint8 [out, in] values 0..15, scales bf16, zeros bf16 [out, in/G])."""
    out_dim, in_dim = w.shape
    g = w.float().view(out_dim, in_dim // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None]) + 8  # with the stored bf16 scale/zero
    return q.clamp(0, 15).to(torch.uint8).view(out_dim, in_dim), scale, zero


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q: [out, in] values 0..15 (in even) -> uint8 [out, in/2], column 2j low nibble, 2j+1 high nibble."""
    q = q.to(torch.uint8)
    # contiguous whatever q's strides (q unpacked from the CPU kernel layout is a transpose): the CUDA packer and
    # safetensors need row-major bytes (`.cuda()` of a CPU-placed layer failed in _convert_weight_to_int4pack)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> uint8 [out, in] values 0..15 (inverse of pack_nibbles)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(1)


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - 8) · scale + zero as q · scale + (zero - 8 · scale) in float32 (q: uint8 codes, read exactly by the
    multiply; scale and zero float32, broadcast over the group): the same float32 operations in every layout, so
    every layout dequantises to the same bits. scale and zero should be contiguous along q's last dimension: a
    strided one takes TensorIterator's unvectorised loop (a 768x256 g32 weight, AVX-512: 145 µs against 35)."""
    return torch.mul(q, scale).add_(zero - 8 * scale)


def kernel_width(in_features: int, group_size: int) -> tuple[int, int]:
    """(K, g): the input width and group size the fused kernels run a layer at. They need K % g == 0 with g in
    GROUP_SIZES, so a width that group_size does not divide is padded only to a multiple of 32, and g is the largest
    group size dividing both K and group_size: each stored group is group_size / g kernel groups with its scale and
    zero. On the bundled model at g128, a 64-wide expert down projection reads half the bytes the padded one did."""
    k = -(-in_features // GROUP_SIZES[0]) * GROUP_SIZES[0]
    return k, max(g for g in GROUP_SIZES if group_size % g == 0 and k % g == 0)


CPU_BLOCKS = (64, 32)  # output rows per block of the CPU kernel layout: AVX512, AVX2 builds


def unpack_cpu_layout(packed: torch.Tensor, out_features: int, in_features: int, block: int, start: int = 0,
                      stop: int | None = None) -> torch.Tensor:
    """`_convert_weight_to_int4pack_for_cpu`'s bytes -> qᵀ uint8 [in, stop - start] for output rows start..stop
    (default: all; start a multiple of `block`, stop too or out_features; see the module docstring), the
    orientation the layout unpacks to without a transpose: rows of `block` values are moved whole.

    Full blocks: [out // block, in, block/2] bytes, row j low nibble, row j + block/2 high; the tail block
    (out % block rows): [in, tail/2] bytes, row 2j low, 2j + 1 high.
    """
    stop = out_features if stop is None else stop
    flat, full = packed.reshape(-1), out_features // block * block
    n = min(stop, full) - start  # this range's rows in full blocks
    head = flat[start * in_features // 2:(start + n) * in_features // 2].view(-1, in_features, block // 2)
    q_t = torch.empty(in_features, stop - start, dtype=torch.uint8, device=packed.device)
    blocks = q_t[:, :n].view(in_features, -1, block).transpose(0, 1)  # [blocks, in, block]
    blocks[..., :block // 2] = head & 0xF
    blocks[..., block // 2:] = head >> 4
    if stop > full:
        tail = flat[full * in_features // 2:].view(in_features, -1)
        q_t[:, n:] = torch.stack((tail & 0xF, tail >> 4), dim=-1).flatten(1)
    return q_t


class Int4Linear(QuantizedLinear):
    scheme = "int4"

    def __init__(self, in_features: int, out_features: int, group_size: int = 128,
                 dtype: torch.dtype = torch.bfloat16, bias: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        if group_size not in GROUP_SIZES:
            raise QuantizationError(f"int4 group_size {group_size} not supported; expected one of {GROUP_SIZES}")
        super().__init__(in_features, out_features, dtype, bias)
        self.group_size = group_size
        self.padded_in = -(-in_features // group_size) * group_size
        self.kernel_in, self.kernel_group = kernel_width(in_features, group_size)  # while in a kernel layout
        groups = self.padded_in // group_size
        self.register_buffer("qweight", torch.zeros(out_features, self.padded_in // 2, dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.bfloat16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.bfloat16, device=device))
        self.register_buffer("scale_and_zero", None, persistent=False)  # [groups, out, 2] while packed
        self.layout = "plain"  # or the device type ("cpu", "cuda") whose kernel layout qweight holds
        self.cpu_block = None  # rows per block of the CPU layout, once its inverse is checked (CPU_BLOCKS)

    # CPU, bf16, one thread (2-core Xeon, torch 2.13): the kernel costs ~5 us per row on a 768x256 matrix and
    # ~0.45 us per row on the bundled model's 64x256 experts; unpacking + dequantising once + a dense matmul costs
    # ~430 us and ~80 us: level at ~90 and ~170 rows. Whole-model 256-token prefill was fastest switching at 128.
    # AVX2 (2-core AMD EPYC, g32, 768x256, 1 / 16 / 128 rows, us): bf16 kernel 45 / 283 / 2177 against dense
    # 1262 / 6428 / 40856 (unpacking and the bf16 matmul are slow without AVX-512): the kernel at every row count;
    # fp32 kernel 516 / 9031 / 56052 against dense 763 / 1154 / 1416: the dense path from 2 rows.
    # AVX-512 EPYC, bf16, g32 (stop 36), kernel against dense path: a 2048x2048 weight crosses over at 64-128 rows,
    # 1408x2048 and 768x256 at 64-128, 256x128 at ~256, the 16-25k-weight layers (64x256, 96x256, 192x96) at
    # 256-512: the dense path's ~25 ops cost ~100 us whatever the size. 128 · (1 + 32768 / weights) follows them:
    # bundled-model prefill 1.31x -> 1.19x bf16's time, all layers at 128 against small ones on the kernel.
    DENSE_ABOVE_ROWS = {"cpu": 128, "cpu/avx2/bfloat16": sys.maxsize, "cpu/avx2/float32": 1}
    DENSE_FIXED_WEIGHTS = {"cpu/avx512/bfloat16": 1 << 15}

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group_size: int = 128, **_) -> "Int4Linear":
        w = linear_rows(linear)
        layer = cls(linear.in_features, linear.out_features, group_size, w.dtype, linear.bias, w.device)
        w = F.pad(w.float(), (0, layer.padded_in - layer.in_features))
        q, layer.scales, layer.zeros = quantize_int4(w, group_size)
        layer.qweight = pack_nibbles(q)
        layer._place()
        return layer

    # ----------------------------------------------------------------- reference
    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.layout == "cuda" and not torch.compiler.is_compiling():
            # eager: a layer whose dense weight is wanted (absorbed kv_b_proj) goes back to the portable layout
            # for good; inside a compiled graph the identity unpack below runs instead (no state changes there)
            self._unpack_kernel()
            if self.impl == "auto":
                self.impl = "reference"
        if self.cpu_block is not None:  # dequantised in the transposed orientation the layout unpacks to
            return self._dequantize_cpu_rows(dtype).t()
        q, scales, zeros = self._plain_tensors()
        w = dequantize_groups(q.reshape(self.out_features, -1, self.group_size), scales.float()[..., None],
                              zeros.float()[..., None])
        return w.view(self.out_features, -1)[:, :self.in_features].to(dtype)

    def _dequantize_cpu_rows(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """CPU layout: Wᵀ [in, stop - start] for output rows start..stop (`unpack_cpu_layout`'s range)."""
        stop = self.out_features if stop is None else stop
        sz = self._buffers["scale_and_zero"][:, start:stop]
        scale, zero = sz.float().permute(2, 0, 1).contiguous()  # [kernel groups, n] each
        q_t = unpack_cpu_layout(self._buffers["qweight"], self.out_features, self.kernel_in, self.cpu_block, start,
                                stop)
        w_t = dequantize_groups(q_t.view(-1, self.kernel_group, stop - start), scale[:, None], zero[:, None])
        return w_t.view(self.kernel_in, -1)[:self.in_features].to(dtype)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows on a CPU: x [..., in] @ Wᵀ dequantised once per call, in slabs of whole layout blocks of
        about CPU_SLAB_ELEMENTS weights, each multiplied while it is in cache (one slab for a small layer). A
        whole-weight float32 temporary of a large layer costs page faults at every call: 2048x2048 g32 at 16 rows,
        25.9 ms whole against ~5 in slabs (docs/results.md, stop 36)."""
        if self.cpu_block is None:
            return super().forward_dense(x)
        rows = max(1, CPU_SLAB_ELEMENTS // (self.kernel_in * self.cpu_block)) * self.cpu_block
        y = slab_product(x, self.out_features, rows,
                         lambda start, stop: self._dequantize_cpu_rows(x.dtype, start, stop).t())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    # ----------------------------------------------------------------- kernel
    def kernel_supported(self, device: torch.device, dtype: torch.dtype) -> bool:
        if device.type == "cpu":
            return (hasattr(torch, "_weight_int4pack_mm_for_cpu") and self.out_features % 16 == 0
                    and dtype in (torch.bfloat16, torch.float16, torch.float32))
        if device.type == "cuda":
            return (dtype == torch.bfloat16 and self.out_features % 8 == 0
                    and torch.cuda.get_device_capability(device)[0] >= 8)
        return False

    def _prepare_kernel(self) -> None:
        self._pack_kernel(self.qweight.device.type)
        if self.layout == "cpu" and self.cpu_block is None:  # no cheap inverse of this CPU's layout: kernel only
            self.dense_above_rows = sys.maxsize

    def forward_kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.kernel_in != self.in_features:  # F.pad's op without its Python wrapper (~2.5 us a call)
            x2d = torch.constant_pad_nd(x2d, (0, self.kernel_in - self.in_features))
        return self._mm(x2d.contiguous(), self._buffers["scale_and_zero"])

    def _mm(self, x2d: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        # the ops as torch.* functions, not torch.ops.aten.*: the same kernels without OpOverload's Python call
        # (1.4 us in a tight loop, ~10 us a call inside an eager decode step: docs/results.md, stop 33); buffers
        # through `_buffers`: nn.Module.__getattr__ costs ~1 us a lookup (the host overhead bench/quant.py measures)
        mm = torch._weight_int4pack_mm_for_cpu if self.layout == "cpu" else torch._weight_int4pack_mm
        return mm(x2d, self._buffers["qweight"], self.kernel_group, sz)

    def _inner_k_tiles(self) -> int:
        return next(t for t in (8, 4, 2) if self.kernel_in % (16 * t) == 0)

    @torch.no_grad()
    def _pack_kernel(self, device_type: str) -> None:
        if self.layout != "plain":
            self._unpack_kernel()
        k, repeat = self.kernel_in, self.group_size // self.kernel_group  # kernel_width
        if device_type == "cpu":
            q = unpack_nibbles(self.qweight[:, :k // 2])
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            self.cpu_block = next((b for b in CPU_BLOCKS if torch.equal(
                unpack_cpu_layout(packed, self.out_features, k, b).t(), q)), None)
        else:  # the CUDA converter takes uint8 [out, in/2] with column 2j in the HIGH nibble (torchao's convention)
            swapped = (self.qweight[:, :k // 2] << 4) | (self.qweight[:, :k // 2] >> 4)
            packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), self._inner_k_tiles())
        sz = torch.stack((self.scales, self.zeros), dim=-1).repeat_interleave(repeat, dim=1)[:, :k // self.kernel_group]
        # [kernel groups, out, 2] in the activations' dtype: bf16 values, exact
        self.scale_and_zero = sz.transpose(0, 1).contiguous().to(self.dtype)
        self.qweight, self.scales, self.zeros, self.layout = packed, None, None, device_type

    @torch.no_grad()
    def _plain_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q uint8 [out, in_padded] values 0..15, scales, zeros bf16 [out, groups]) from whichever layout."""
        if self.layout == "plain":
            return unpack_nibbles(self.qweight), self.scales, self.zeros
        sz, k = self.scale_and_zero, self.kernel_in
        stored = sz[::self.group_size // self.kernel_group]  # one kernel group of each stored group
        scales, zeros = stored[..., 0].t().to(torch.bfloat16), stored[..., 1].t().to(torch.bfloat16)
        if self.cpu_block is not None:
            q = unpack_cpu_layout(self.qweight, self.out_features, k, self.cpu_block).t()
        else:  # rows of the identity through the kernel with scale 1 and zero 8 give q itself (exact: q <= 15)
            unit = torch.stack((torch.ones_like(sz[..., 0]), torch.full_like(sz[..., 0], 8)), dim=-1)
            cols = []
            for k0 in range(0, k, _UNPACK_CHUNK):
                n = min(_UNPACK_CHUNK, k - k0)
                eye = torch.zeros(n, k, dtype=sz.dtype, device=sz.device)
                eye[torch.arange(n), k0 + torch.arange(n)] = 1
                cols.append(self._mm(eye, unit))  # [n, out] = q[:, k0:k0+n]ᵀ
            q = torch.cat(cols).t().round().to(torch.uint8)
        return F.pad(q, (0, self.padded_in - k), value=8), scales, zeros  # the columns past K: q = 8

    def _portable(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, scales, zeros) as stored on disk."""
        q, scales, zeros = self._plain_tensors()
        return pack_nibbles(q), scales, zeros

    def _unpack_kernel(self) -> None:
        self.qweight, self.scales, self.zeros = self._portable()
        self.scale_and_zero, self.layout, self.cpu_block = None, "plain", None

    # ----------------------------------------------------------------- state and moves see the portable layout
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "plain":
            for name, tensor in zip(("qweight", "scales", "zeros"), self._portable()):
                destination[prefix + name] = tensor
        # the zero-padded columns are not stored: qweight [out, ceil(in/2)] (a 96-wide layer in groups of 128 would
        # otherwise store a third more); loading pads them back
        destination[prefix + "qweight"] = destination[prefix + "qweight"][:, :-(-self.in_features // 2)]

    def nbytes(self) -> int:
        groups = self.padded_in // self.group_size
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.out_features * (-(-self.in_features // 2) + 2 * 2 * groups) + bias  # as _save_to_state_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if self.layout != "plain":
            self._unpack_kernel()
        q = state_dict.get(prefix + "qweight")
        if q is not None and q.dim() == 2 and q.shape[1] == -(-self.in_features // 2) < self.padded_in // 2:
            # stored without the padded columns: any value serves there (they meet zero-padded inputs), 0x88 is q = 8
            state_dict[prefix + "qweight"] = F.pad(q, (0, self.padded_in // 2 - q.shape[1]), value=0x88)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        if self.layout != "plain":
            self._unpack_kernel()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, layout={self.layout}"
