"""Speed that needs more than plain PyTorch, kept beside the model and applied to it from the outside (as gpt-fast
compiles `decode_one_token`): each fast path here is a separate function with the plain reference it must equal
next to it, and a test of their agreement on random inputs.

- `moe_triton`: the MoE's routed down projection for decode steps on a GPU as one Triton kernel (gather, matvec,
  weighted sum over the K chosen experts), installed on a model's MoE layers by `moe_triton.install(model)`.
"""
