"""Fast inference paths against their references: MoE gather/grouped vs the per-token loop, the stacked expert
weights staying in step with the modules, complex-multiply RoPE vs real arithmetic, causal SDPA vs the explicit
mask, sync-free greedy decoding vs the per-step check, the SwiGLU hidden stored once when inductor lowers a compiled
decode step as on a GPU, and the torch.compile'd decode step vs eager (prefill and decode graphs, ~100 s cold on a
2-core CPU with the 2-layer COMPILE_SIZED model: the slowest test in the suite)."""

import copy
import re

import pytest
import torch

import dsv3
from dsv3 import ModelConfig, Transformer
from dsv3.fast.matvec import FEW_ROWS, few_row_product
from dsv3.fast.moe import argmax_top_indices, every_expert, fused_gather
from dsv3.moe import MoE

from server_utils import COMPILE_SIZED


def _moe(dtype=torch.float32, **overrides) -> MoE:
    torch.manual_seed(0)
    cfg = ModelConfig.tiny(**overrides)
    moe = MoE(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.1)
    return moe


def _route(moe: MoE, n: int, dtype=torch.float32):
    x = torch.randn(n, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(n)).to(dtype)
    weights, indices, _ = moe.gate(x)
    return x, weights, indices


@pytest.mark.parametrize("path", ["auto", "loop", "gather", "grouped"])
@pytest.mark.parametrize("n", [1, 3, 40])
def test_routed_paths_equal_the_reference_fp32(path, n):
    moe = _moe()
    moe.path = path
    x, weights, indices = _route(moe, n)
    with torch.inference_mode():
        ref = moe.routed_reference(x, weights, indices)
        out = moe.routed(x, weights, indices)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["gather", "grouped"])
def test_routed_paths_agree_in_bf16(path):
    moe = _moe(torch.bfloat16)
    x, weights, indices = _route(moe, 17, torch.bfloat16)
    with torch.inference_mode():
        ref = moe.routed_reference(x, weights, indices).float()
        moe.path = path
        out = moe.routed(x, weights, indices).float()
    assert (out - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 40])
def test_compiled_graph_formulations_equal_their_eager_references(dtype, n):
    """dsv3/fast/moe.py's formulations, called in eager: argmax rounds pick torch.topk's set, the fused gather and
    every-expert sums equal the gathered bmm path and the per-token reference."""
    moe = _moe(dtype)
    x, weights, indices = _route(moe, n, dtype)
    scores = torch.randn(n, 3, 64, generator=torch.Generator().manual_seed(n))  # distinct: one top-k set
    assert torch.equal(argmax_top_indices(scores, 6).sort(-1).values, scores.topk(6).indices.sort(-1).values)
    with torch.inference_mode():
        stacks = moe.stacks.get(moe.experts)
        ref, gathered = moe.routed_reference(x, weights, indices), moe.routed_gather(x, weights, indices, *stacks)
        fused, dense = fused_gather(x, weights, indices, *stacks), every_expert(moe.experts, x, weights, indices)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for out in (fused, dense):
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out, gathered, **tol)
        torch.testing.assert_close(out, ref, **tol)


def test_prepare_changes_nothing_eager():
    """`dsv3.fast.prepare` gives the modules their compiled forms; eager logits stay bit-identical, and preparing
    twice changes no class again."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(ids)
        classes = [type(m) for m in dsv3.fast.prepare(model).modules()]
        assert isinstance(model.model.layers[-1].mlp, dsv3.fast.moe.CompiledMoE)
        assert [type(m) for m in dsv3.fast.prepare(model).modules()] == classes
        assert torch.equal(model(ids), before)
    dsv3.dsa.add_indexers(model, 2, 16, 4)  # a prepared model still becomes a DSA one, in every layer
    assert all(type(layer.self_attn) is dsv3.dsa.SparseMLA for layer in [*model.model.layers, *model.mtp])


def test_prepared_graphs_normalise_with_the_fused_op_and_take_no_cpu_scalar():
    """Eager RMSNorm keeps its eps as a CPU scalar tensor; traced, that would be a CPU input of the graph, for which
    inductor captures no CUDA graph. After `prepare` a graph normalises through F.rms_norm instead: no such input,
    and the graph's logits equal eager's."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    inputs = []

    def backend(gm, example_inputs):  # records the graph's inputs, then runs it as traced
        inputs.extend(t for t in example_inputs if isinstance(t, torch.Tensor))
        return gm

    def cpu_scalars(fn, x):
        inputs.clear()
        torch._dynamo.reset()
        with torch.inference_mode():
            out = torch.compile(fn, backend=backend)(x)
        assert inputs, "no graph was traced"
        return out, [t for t in inputs if t.dim() == 0 and t.is_floating_point()]

    hidden = torch.randn(1, 5, model.config.hidden_size)
    assert cpu_scalars(model.model.norm, hidden)[1]  # the check can fail: unprepared, eps is an input
    out, scalars = cpu_scalars(dsv3.fast.prepare(model), ids)
    assert not scalars
    with torch.inference_mode():
        torch.testing.assert_close(out, model(ids))
    torch._dynamo.reset()


@pytest.mark.parametrize("n", [1, 40])
def test_grouped_gather_back_equals_the_scatter_add(n):
    """routed_grouped's two ways back to token order (CUDA: 8-bit sort keys, row gather + sum; CPU: index_add_)."""
    moe = _moe()
    x, weights, indices = _route(moe, n)
    with torch.inference_mode():
        stacks = moe.stacks.get(moe.experts)
        gathered = moe.routed_grouped(x, weights, indices, *stacks, gather_back=True)
        scattered = moe.routed_grouped(x, weights, indices, *stacks, gather_back=False)
        ref = moe.routed_reference(x, weights, indices)
    torch.testing.assert_close(gathered, scattered, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gathered, ref, rtol=1e-5, atol=1e-6)


def test_compiled_cpu_paths_equal_the_reference(monkeypatch):
    """Under torch.compile on CPU, decode steps take the gather path, a multiply-and-sum that inductor fuses with
    the gather, at every batch size (40 tokens exceed few_pairs): no graph break, and no graph split by
    batch size (a static graph for 1 token, one dynamic graph for 3 and 40). Prompt tokens take the grouped
    matmuls through the opaque dsv3::cpu_grouped_mm (fp32 ones cannot be traced, torch 2.13), also unbroken."""
    moe = dsv3.fast.prepare(_moe())
    called = []
    monkeypatch.setattr(dsv3.fast.moe, "fused_gather",
                        lambda *a, _f=fused_gather, **k: called.append("gather") or _f(*a, **k))
    original = moe.routed_grouped
    monkeypatch.setattr(moe, "routed_grouped", lambda *a, **k: called.append("grouped") or original(*a, **k))
    for decode_step, path in ((True, "gather"), (False, "grouped")):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        routed = torch.compile(moe.routed, fullgraph=True)
        for n in (1, 3, 40):
            x, weights, indices = _route(moe, n)
            with torch.inference_mode():
                moe.routed(x, weights, indices)  # eager first: builds the stacks
                called.clear()
                compiled = routed(x, weights, indices, decode_step=decode_step)
                ref = moe.routed_reference(x, weights, indices)
            assert called == [path]  # traced once per graph: the path the graph holds
            torch.testing.assert_close(compiled, ref, rtol=1e-5, atol=1e-6)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def _gpu_lowering(monkeypatch) -> None:
    """Make inductor lower CPU graphs as it does a GPU decode step: its GPU rules for what to store (its CPU rules
    store any reused exp anyway), and one-row matmuls as multiply-and-sum reductions (what coordinate-descent
    tuning, on in dsv3's CUDA decode step, makes of them on a GPU; on CPU they stay library calls)."""
    from torch._inductor import decomposition, ir
    monkeypatch.setattr(ir, "is_cpu", lambda node: False)
    mm = torch.ops.aten.mm.default
    library_mm = decomposition.decompositions[mm]
    # the table inductor reads is a cached copy once anything has compiled in this process: patch both
    for table in (decomposition.decompositions, decomposition.select_decomp_table()):
        monkeypatch.setitem(table, mm, lambda a, b, *rest: (a[:, :, None] * b[None]).sum(1) if a.shape[0] == 1
                            else library_mm(a, b, *rest))


def _reduction_loops(code: str) -> list[str]:
    """The bodies of the reduction loops in inductor's C++ code: the loop after each accumulator's initialisation."""
    loops = []
    for start in re.finditer(r"tmp_acc0_vec = [^;]*\(0\);", code):
        depth, i = 0, code.index("{", code.index("for(", start.end()))
        for j in range(i, len(code)):
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            if depth == 0:
                loops.append(code[i:j])
                break
    return loops


@pytest.mark.inductor_codegen
@pytest.mark.parametrize("where", ["routed gather", "shared MLP"])
def test_compiled_swiglu_hidden_is_stored_not_recomputed_per_weight(monkeypatch, where):
    """bf16 at batch 1, lowered as on a GPU: the down projection loads the SwiGLU hidden instead of evaluating
    silu inside its reduction for every weight element (docs/results.md: the routed one ran at 1.6 TB/s on an
    H200), and the compiled result still equals eager (copied weights and bmm, or library matmuls)."""
    from torch._inductor.utils import run_and_get_code
    _gpu_lowering(monkeypatch)
    moe = dsv3.fast.prepare(_moe(torch.bfloat16))
    x, weights, indices = _route(moe, 1, torch.bfloat16)
    torch._dynamo.reset()
    with torch.inference_mode(), torch._inductor.config.patch(force_disable_caches=True):
        if where == "routed gather":
            fn, args = fused_gather, (x, weights, indices, *moe.stacks.tensors)
        else:
            fn, args = moe.shared_experts, (x,)
        eager = fn(*args)
        compiled, codes = run_and_get_code(torch.compile(fn, fullgraph=True), *args)
    torch._dynamo.reset()
    reductions = _reduction_loops("".join(codes))
    assert len(reductions) == 2  # gate and up (one loop), then down
    assert not any(".exp()" in body for body in reductions)
    assert (compiled.float() - eager.float()).norm() / eager.float().norm() < 1e-2


def test_compiled_training_step_through_the_mlp_keeps_its_gradients():
    """`stored` only hints inductor at inference: a compiled forward with gradients backpropagates as eager does."""
    from dsv3.layers import MLP
    torch.manual_seed(0)
    mlp, x = dsv3.fast.prepare(MLP(16, 32)), torch.randn(3, 16, requires_grad=True)
    torch._dynamo.reset()
    torch.compile(mlp)(x).square().sum().backward()
    torch._dynamo.reset()
    compiled = (x.grad.clone(), mlp.down_proj.weight.grad.clone())
    x.grad, mlp.down_proj.weight.grad = None, None
    mlp(x).square().sum().backward()
    torch.testing.assert_close(compiled, (x.grad, mlp.down_proj.weight.grad))


ROUTINGS = [
    dict(topk_method="noaux_tc", scoring_func="sigmoid", n_routed_experts=32, n_group=4, topk_group=2,
         num_experts_per_tok=6),  # V3's: group top-2 sums, top groups, then experts
    dict(topk_method="greedy", scoring_func="softmax", n_routed_experts=64, n_group=1, topk_group=1,
         num_experts_per_tok=6),  # V2-Lite's
    dict(topk_method="group_limited_greedy", scoring_func="softmax", n_routed_experts=16, n_group=4, topk_group=2,
         num_experts_per_tok=4),  # V2's
]


def _compiled_router(routing):
    """(eager (weights, indices), compiled (weights, indices), inductor's generated code) for one routing method."""
    from torch._inductor.utils import run_and_get_code
    moe = dsv3.fast.prepare(_moe(**routing))
    with torch.no_grad():
        moe.gate.e_score_correction_bias.normal_(std=0.05) if moe.gate.e_score_correction_bias is not None else None
    x = torch.randn(7, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.inference_mode():
        weights, indices, _ = moe.gate(x)
        (c_weights, c_indices, _), codes = run_and_get_code(torch.compile(moe.gate, fullgraph=True), x)
    torch._dynamo.reset()
    return (weights, indices), (c_weights, c_indices), "".join(codes)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_compiled_router_picks_the_eager_experts(routing):
    """Inside a compiled graph the router's top-k are argmax rounds (`argmax_top_indices`): the same experts with the
    same weights as eager torch.topk, for every routing method."""
    (weights, indices), (c_weights, c_indices), _ = _compiled_router(routing)
    order, c_order = indices.argsort(-1), c_indices.argsort(-1)  # both unordered: compare as sets
    assert torch.equal(indices.gather(1, order), c_indices.gather(1, c_order))
    torch.testing.assert_close(weights.gather(1, order), c_weights.gather(1, c_order))


@pytest.mark.inductor_codegen
def test_compiled_router_leaves_no_library_topk():
    """The argmax rounds are reductions inductor generates itself: no topk call left in the graph (a library
    gatherTopK kernel per layer on a GPU, docs/results.md)."""
    assert "topk" not in _compiled_router(ROUTINGS[0])[2]


def test_auto_picks_pairs_then_grouped_on_cpu_and_copy_free_paths_without_it(monkeypatch):
    """CPU: the copy-free pairs for a few pairs (N·K <= cpu_few_pairs), grouped matmuls above; without them (fp64
    here, or a torch without _grouped_mm) the loop above; training: the module loop."""
    moe = _moe()
    called = []
    for name in ("routed_loop", "routed_pairs", "routed_gather", "routed_grouped"):
        original = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _n=name, _f=original: called.append(_n) or _f(*a))
    with torch.inference_mode():
        for n in (1, 2, 20, 200):
            moe.routed(*_route(moe, n))
        assert called == ["routed_pairs", "routed_pairs", "routed_grouped", "routed_grouped"]  # K = 2: 2, 4, 40 pairs
        called.clear()
        moe.double()
        for n in (1, 2, 20, 200):
            moe.routed(*_route(moe, n, torch.float64))
        assert called == ["routed_pairs", "routed_pairs", "routed_loop", "routed_loop"]
        called.clear()
        moe.float()
    with torch.enable_grad():  # training: gradients must reach the modules, so the loop runs
        moe.routed(*_route(moe, 1))
    assert called == ["routed_loop"]


def test_stacked_weights_follow_in_place_updates_load_state_dict_and_dtype_changes():
    moe = _moe()
    x, weights, indices = _route(moe, 5)
    with torch.inference_mode():
        moe.routed(x, weights, indices)  # builds the stacks
    with torch.no_grad():
        moe.experts[2].up_proj.weight.mul_(3.0)  # in place: goes through the views
    moe.path = "gather"
    with torch.inference_mode():
        torch.testing.assert_close(moe.routed(x, weights, indices), moe.routed_reference(x, weights, indices))
    fresh = _moe()
    fresh.experts[1].down_proj.weight.data.mul_(-1)
    for assign in (False, True):
        moe.load_state_dict(fresh.state_dict(), assign=assign)
        with torch.inference_mode():
            torch.testing.assert_close(moe.routed(x, weights, indices), fresh.routed_reference(x, weights, indices))
    moe.double()
    with torch.inference_mode():
        out = moe.routed(x.double(), weights, indices)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, fresh.double().routed_reference(x.double(), weights, indices))


def test_replaced_expert_linear_falls_back_to_the_loop():
    moe = _moe()
    x, weights, indices = _route(moe, 4)
    with torch.inference_mode():
        moe.routed(x, weights, indices)

    class Scaled(torch.nn.Linear):  # stands in for a quantized or LoRA linear: not a plain nn.Linear
        def forward(self, x):
            return 2 * super().forward(x)

    old = moe.experts[3].gate_proj
    moe.experts[3].gate_proj = Scaled(old.in_features, old.out_features, bias=False)
    moe.experts[3].gate_proj.weight.data.copy_(old.weight)
    with torch.inference_mode():
        torch.testing.assert_close(moe.routed(x, weights, indices), moe.routed_reference(x, weights, indices))


def test_training_gradients_reach_the_expert_modules_after_fast_inference():
    moe = _moe()
    x, weights, indices = _route(moe, 6)
    with torch.inference_mode():
        moe.routed(x, weights, indices)
    moe.train()
    moe(x[None]).sum().backward()
    assert all(e.gate_proj.weight.grad is not None for e, n in zip(moe.experts, indices.flatten().bincount(
        minlength=len(moe.experts))) if n > 0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.tiny()).eval()


@pytest.fixture(scope="module")
def small():
    """For the tests that compile the whole model: tracing and lowering grow with its layers."""
    torch.manual_seed(0)
    return Transformer(ModelConfig.tiny(**COMPILE_SIZED)).eval()


def test_model_logits_are_the_same_with_every_moe_path(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    outs = []
    with torch.inference_mode():
        for path in ("loop", "gather", "grouped"):
            for m in moes:
                m.path = path
            outs.append(model(ids))
    for m in moes:
        m.path = "auto"
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_rope_equals_the_real_arithmetic_reference(dtype):
    from dsv3.rope import apply_rope, apply_rope_reference
    g = torch.Generator().manual_seed(0)
    angles = torch.randn(2, 5, 8, generator=g) * 50  # large angles too, as at long positions
    cos, sin = angles.cos(), angles.sin()
    q = torch.randn(2, 5, 3, 40, generator=g).to(dtype)[..., 24:]  # a slice at an offset, as MLA's q_pe is
    k = torch.randn(2, 5, 16, generator=g).to(dtype)
    for x in (q, k):
        fast, ref = apply_rope(x, cos, sin, True), apply_rope_reference(x, cos, sin, True)
        assert fast.dtype == dtype and fast.shape == x.shape
        torch.testing.assert_close(fast, ref)  # dtype-aware defaults: fp32 1.3e-6, bf16 one rounding step
    assert torch.equal(apply_rope(k, cos, sin, False), apply_rope_reference(k, cos, sin, False))


def test_causal_prefill_equals_the_explicitly_masked_one(model):
    """A prefill whose keys are exactly its own tokens runs SDPA with is_causal (no mask tensor); attending over a
    longer cache span takes the masked path. Same logits, same cache."""
    ids = torch.randint(2, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        causal_cache, masked_cache = model.new_cache(2, 16), model.new_cache(2, 16)
        causal = model(ids, causal_cache, 0)
        masked = model(ids, masked_cache, 0, attend_length=16)
    torch.testing.assert_close(causal, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(causal_cache.kv, masked_cache.kv, rtol=1e-5, atol=1e-5)


def test_compiled_prefill_is_one_graph_with_the_eager_logits(small):
    """torch.compile(model) for a prefill (bench/decode.py's compiled prefill row), after `dsv3.fast.prepare`: one
    graph, same logits."""
    dsv3.fast.prepare(small)
    ids = torch.randint(2, small.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        eager = small(ids)
        compiled = torch.compile(small, fullgraph=True)(ids)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_sync_free_decoding_with_stops_equals_the_per_step_check(model):
    ids = torch.randint(2, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(2))
    free = dsv3.generate(model, ids, 12)
    stop = int(free[1, 8])  # a token row 1 emits mid-way: rows stop at different steps
    ref = dsv3.generate(model, ids, 12, stop_token_ids=[stop], sync_every=1)
    for every in (4, 100):
        assert torch.equal(dsv3.generate(model, ids, 12, stop_token_ids=[stop], sync_every=every), ref)



def test_static_decode_step_equals_the_reference_step(model):
    """The static-shape step (tensor positions, attention over the whole cache, masked) that torch.compile and
    CUDA graphs run is the same function as the plain step, per row at different positions."""
    from dsv3.fast import static_step
    from dsv3.generation import _step
    ids = torch.randint(2, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref_cache, static_cache = model.new_cache(2, 16), model.new_cache(2, 16)
        for cache in (ref_cache, static_cache):
            model(ids, cache, 0)
        for pos in range(6, 10):
            tokens = ids[:, pos - 6]
            ref = _step(model, tokens, ref_cache, pos)
            static = static_step(model, tokens, static_cache, torch.tensor([pos, pos]))
            torch.testing.assert_close(static, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(static_cache.kv, ref_cache.kv)  # later layers: summation order over S differs


def test_compiled_decode_step_gives_the_eager_tokens(small):
    """generate(compile=True) runs the static-shape decode step through torch.compile (inductor), one graph: on CPU
    the MoE must take the sync-free gather path there (the copy-free pairs path reads expert ids on the host).
    Other batch sizes: test_compiled_cpu_paths_equal_the_reference compiles the MoE's decode path at 1, 3 and 40
    tokens, and tests/test_engine.py a step whose batch size is dynamic."""
    model = small
    ids = torch.randint(2, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    compiled = dsv3.generate(model, ids, 10, compile=True)
    assert torch.equal(compiled, dsv3.generate(model, ids, 10))
    # steps after the first skip dynamo's guard checks, around the call only: never while the caller runs
    from torch._dynamo.eval_frame import _is_skip_guard_eval_unsafe_stance
    for _ in dsv3.stream_generate(model, ids, 4, compile=True):
        assert not _is_skip_guard_eval_unsafe_stance()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(dsv3.fast.static_step)(
            model, compiled[:, -1], model.new_cache(2, 20), torch.tensor([9, 9]))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_few_row_product_is_the_matrix_product_and_leaves_the_rest_to_the_library():
    """dsv3/fast/matvec.py: products of up to FEW_ROWS rows with K contiguous in b (nn.Linear's Wᵀ, transposed
    keys) become a multiply-and-sum equal to a @ b on random inputs, 2-D and batched; more rows, a strided K, or a
    tensor off the CPU keep inductor's own rule."""
    g = torch.Generator().manual_seed(5)
    w, keys = torch.randn(80, 96, generator=g), torch.randn(3, 40, 96, generator=g)  # [N, K], [B, S, K]
    for rows in range(1, FEW_ROWS + 1):
        a, q = torch.randn(rows, 96, generator=g), torch.randn(3, rows, 96, generator=g)
        torch.testing.assert_close(few_row_product(a, w.T), a @ w.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(few_row_product(q, keys.mT), q @ keys.mT, rtol=1e-5, atol=1e-5)
    assert few_row_product(torch.randn(FEW_ROWS + 1, 96, generator=g), w.T) is NotImplemented
    assert few_row_product(torch.randn(1, 80, generator=g), w) is NotImplemented  # K strided in b
    assert few_row_product(a.to("meta"), w.T.to("meta")) is NotImplemented  # not a CPU tensor


def test_compiled_cpu_decode_step_reads_few_row_weights_itself(small):
    """At batch 1 the compiled CPU decode step calls no library matmul for row-stored weights (each projection is a
    generated loop over the weight, dsv3/fast/matvec.py), and gives the eager logits; past FEW_ROWS rows, or for a
    weight `dsv3.fast.arrange` stored by columns, the library serves them."""
    from torch._inductor.utils import run_and_get_code
    from dsv3.fast.matvec import cpu_decode_backend
    from dsv3.generation import _step
    model = dsv3.fast.prepare(copy.deepcopy(small))
    for p in model.parameters():
        p.data = p.data.contiguous()  # rows, whatever the fixture's earlier generate calls chose
    step = torch.compile(dsv3.fast.static_step, backend=cpu_decode_backend)
    for B, library in ((1, False), (FEW_ROWS + 1, True), (1, True)):
        if library and B == 1:
            assert dsv3.fast.layout.by_columns(dsv3.fast.arrange(model).lm_head.weight)
        ids = torch.randint(2, model.config.vocab_size, (B, 5), generator=torch.Generator().manual_seed(B))
        with torch.inference_mode():
            cache, ref_cache = model.new_cache(B, 12), model.new_cache(B, 12)
            model(ids, cache, 0), model(ids, ref_cache, 0)
            torch._dynamo.reset()
            logits, code = run_and_get_code(step, model, ids[:, -1], cache, torch.full((B,), 5))
            torch.testing.assert_close(logits, _step(model, ids[:, -1], ref_cache, 5), rtol=1e-4, atol=1e-4)
        assert bool(re.search(r"aoti_torch_cpu_(add)?mm_out", "".join(code))) is library


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_arranged_weights_give_the_row_stored_products(rows):
    """dsv3/fast/layout.py: `arrange` stores a float32 CPU weight by columns where `prefers_columns` says so (output
    >= 512 and >= twice the input) and leaves the rest; the products equal the row-stored ones on random inputs, the
    parameters stay the same objects (arranged inside inference mode, they still train), a second call copies
    nothing, and a weight cast to bf16 goes back to rows."""
    g = torch.Generator().manual_seed(rows)
    layers = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.Linear(1024, 256), torch.nn.Linear(256, 512))
    columns = [True, False, True]
    x = torch.randn(rows, 64, generator=g)
    ref = layers(x)
    params = list(layers.parameters())
    with torch.inference_mode():
        dsv3.fast.arrange(layers)
    assert [dsv3.fast.layout.by_columns(layer.weight) for layer in layers] == columns
    assert [layer.weight.is_contiguous() for layer in layers] == [not c for c in columns]
    assert all(a is b for a, b in zip(layers.parameters(), params))
    torch.testing.assert_close(layers(x), ref, rtol=1e-5, atol=1e-5)
    layers(x).square().sum().backward()  # not inference tensors
    assert layers[0].weight.grad.shape == (1024, 64)
    pointers = [layer.weight.data_ptr() for layer in layers]
    assert [layer.weight.data_ptr() for layer in dsv3.fast.arrange(layers)] == pointers
    assert all(layer.weight.is_contiguous() for layer in dsv3.fast.arrange(layers.bfloat16()))


def test_generate_and_the_engine_arrange_the_weights_on_cpu():
    """`dsv3.generate` (eager or compiled) and the Engine store the CPU float32 lm_head by columns: the eager decode
    step's largest product, 2.5x faster that way with MKL (docs/results.md, stop 36). The tokens are unchanged."""
    from dsv3.engine import Engine
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny()).eval()
    ids = torch.randint(2, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = [ids]
        for _ in range(5):  # greedy tokens by whole-sequence forwards on the row-stored weights
            ref.append(model(torch.cat(ref, 1))[:, -1:].argmax(-1))
    assert not dsv3.fast.layout.by_columns(model.lm_head.weight)
    assert torch.equal(dsv3.generate(model, ids, 5), torch.cat(ref, 1))
    assert dsv3.fast.layout.by_columns(model.lm_head.weight)
    model.lm_head.weight.data = model.lm_head.weight.data.contiguous()
    Engine(model, tokenizer=None)  # the engine reads its tokenizer only when requests arrive
    assert dsv3.fast.layout.by_columns(model.lm_head.weight)
    with torch.inference_mode():  # a model made under inference mode keeps inference tensors, and generates
        made = Transformer(ModelConfig.tiny()).eval()
        made.load_state_dict(model.state_dict())
    assert torch.equal(dsv3.generate(made, ids, 5), torch.cat(ref, 1)) and made.lm_head.weight.is_inference()


@pytest.mark.parametrize("scheme, dtype, absent, tol", [("int8", torch.float32, "_weight_int8pack_mm", 1e-4),
                                                       ("fp8", torch.bfloat16, "Half", 2e-2)])
def test_compiled_cpu_decode_step_reads_quantized_weights_itself(scheme, dtype, absent, tol):
    """A quantized model's compiled CPU decode step at batch 1 reads its weights in code inductor vectorises, with
    the eager logits: int8 in the cast-and-matmul form (dsv3.fast.layers.FewRowInt8), which the few-row reduction
    reads as int8 in one loop, no library int8 kernel in the generated code; fp8 dequantised as the reference does
    (dsv3.fast.layers.CastFP8), no float16 view of the eager bit read (inductor does not vectorise a node mixing it
    with bf16)."""
    from torch._inductor.utils import run_and_get_code
    from dsv3.fast.matvec import cpu_decode_backend
    from dsv3.generation import _step
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny(**COMPILE_SIZED)).eval().to(dtype)
    model = dsv3.fast.prepare(dsv3.quantize(model, scheme))
    step = torch.compile(dsv3.fast.static_step, backend=cpu_decode_backend)
    ids = torch.randint(2, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache, ref_cache = model.new_cache(1, 12), model.new_cache(1, 12)
        model(ids, cache, 0), model(ids, ref_cache, 0)
        torch._dynamo.reset()
        logits, code = run_and_get_code(step, model, ids[:, -1], cache, torch.full((1,), 5))
        torch.testing.assert_close(logits, _step(model, ids[:, -1], ref_cache, 5), rtol=tol, atol=tol)
    assert absent not in "".join(code)


def test_compiled_prefill_is_one_unbroken_graph_for_every_prompt_length(small):
    """On CPU, compile=True also runs the prefill through torch.compile with dynamic shapes: no graph break (the
    MoE's expert stacks are built eagerly first, and its grouped matmuls are an opaque op), the eager logits, and
    one graph for every prompt length, including one equal to the hidden size (duck sizing would pin it)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from dsv3.generation import _prefill, prefill_step
    model = small
    run = prefill_step(compile=True, device_type="cpu")
    prompts = [torch.randint(2, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
               for T in (model.config.hidden_size, 5, 23)]  # made outside inference mode, as generate's are
    with torch.inference_mode():
        for ids in prompts:
            T = ids.shape[1]
            eager = _prefill(model, ids, model.new_cache(2, T + 3))
            torch.testing.assert_close(run(model, ids, model.new_cache(2, T + 3)), eager, rtol=1e-5, atol=1e-5)
        assert len(_debug_get_cache_entry_list(_prefill.__code__)) == 1
        explanation = torch._dynamo.explain(_prefill)(model, ids, model.new_cache(2, 30))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_static_cache_marks_every_tensor_the_step_reads(model):
    """A CUDA graph replay copies in each graph input whose address is not static: the cache's buffers and its
    constant index tensors (layer ids, batch rows; a row view has its own) are all marked. The mark is only an
    attribute here, so this runs on CPU."""
    cache = model.new_cache(3, 8)
    view = cache.rows(slice(0, 2))
    assert view.row_ids.shape == (2, 1) and torch.equal(view.layer_ids, cache.layer_ids)
    dsv3.fast.mark_static_cache(view, guard=False)
    for t in (view.kv, view.pe, view.layer_ids, view.row_ids):
        assert getattr(t, "_dynamo_static_input_type", None) == "unguarded"
    assert getattr(cache.row_ids, "_dynamo_static_input_type", None) is None
