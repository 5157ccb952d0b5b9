"""Weight quantization: INT8 (per channel), INT4 (group-wise, packed), FP8 (DeepSeek-V3's 128×128 blocks).

    from dsv3.quant import quantize, save_quantized
    quantize(model, "int4", group_size=128)      # in place; lm_head, embedding and router stay high precision
    save_quantized(model, "out/")                # dsv3.load_pretrained("out/") gives it back, quantized
    dsv3.load_pretrained(fp8_dir, keep_fp8=True)  # DeepSeek's FP8 release stays FP8 in memory

Formats and sources: docs/eval-lora-quant.md §4, docs/architecture.md §6; one module per scheme.
"""

from .apply import (DEFAULT_SKIP, SCHEMES, quantization_config, quantize, quantized_layers, save_quantized,
                    set_impl, skipped)
from .base import QuantizationError, QuantizedLinear
from .fp8 import FP8Linear, quantize_fp8
from .int4 import Int4Linear, quantize_int4
from .int8 import Int8Linear, quantize_int8

__all__ = ["DEFAULT_SKIP", "FP8Linear", "Int4Linear", "Int8Linear", "QuantizationError", "QuantizedLinear", "SCHEMES",
           "quantization_config", "quantize", "quantize_fp8", "quantize_int4", "quantize_int8",
           "quantized_layers", "save_quantized", "set_impl", "skipped"]
