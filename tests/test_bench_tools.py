"""bench/ab.py (the paired A/B of this tree against an earlier commit: its round logic, its bad-revision error),
bench/cpu_profile.py (where a decode step's time goes) and bench/cpu_layout.py (the storage-order grid). Timings are printed by the benchmarks, never asserted."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import ab  # noqa: E402
import cpu_profile  # noqa: E402


class FakeWorker:
    """Times k tokens as prefill + (k - 1) * per_token, on both clocks, and logs who ran when."""

    def __init__(self, name, prefill, per_token, log):
        self.name, self.prefill, self.per_token, self.log = name, prefill, per_token, log

    def time(self, k):
        self.log.append(self.name)
        t = self.prefill + (k - 1) * self.per_token
        return {"cpu": t, "wall": 2 * t, "tokens": [k]}


def test_paired_rounds_alternate_and_split_prefill_from_decode():
    log = []
    workers = {"base": FakeWorker("base", 0.05, 0.004, log), "head": FakeWorker("head", 0.04, 0.002, log)}
    res = ab.paired(workers, rounds=3, n=9)
    # each worker times 1 then n tokens; the order of the workers flips every round
    assert log == ["base", "base", "head", "head", "head", "head", "base", "base", "base", "base", "head", "head"]
    assert res["base"]["cpu"]["prefill"] == [0.05] * 3
    assert all(abs(d - 0.002) < 1e-12 for d in res["head"]["cpu"]["decode"])
    assert all(abs(d - 0.008) < 1e-12 for d in res["base"]["wall"]["decode"])
    assert res["head"]["tokens"] == [9]


class FakeStepper:
    """--per-step's worker: a prefill, then one step at a time, each taking `step` seconds; logs who ran when."""

    def __init__(self, name, step, log):
        self.name, self.step, self.log, self.n = name, step, log, 0

    def time(self, what):
        self.log.append((self.name, what))
        self.n = 0 if what == "prefill" else self.n + 1
        return {"cpu": self.step, "token": self.n}


def test_per_step_turns_alternate_every_step_and_pair_the_steps():
    log = []
    workers = {"base": FakeStepper("base", 0.015, log), "head": FakeStepper("head", 0.012, log)}
    res = ab.per_step(workers, rounds=2, n=3)
    assert log == [("base", "prefill"), ("head", "prefill"), ("base", "step"), ("head", "step"), ("head", "step"),
                   ("base", "step"), ("base", "step"), ("head", "step"),  # round 1; round 2 starts the other way
                   ("base", "prefill"), ("head", "prefill"), ("head", "step"), ("base", "step"), ("base", "step"),
                   ("head", "step"), ("head", "step"), ("base", "step")]
    assert res["base"]["decode"] == [0.015] * 6 and res["head"]["decode"] == [0.012] * 6
    assert res["base"]["tokens"] == res["head"]["tokens"] == [0, 1, 2, 3]  # the last round's prefill and steps


def test_unknown_base_is_one_clear_line():
    out = subprocess.run([sys.executable, str(BENCH / "ab.py"), "--base", "no-such-revision-xyz"],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "--base no-such-revision-xyz" in out.stderr and "Traceback" not in out.stderr


def test_cpu_layout_prints_the_grid_and_marks_what_dsv3_stores_by_columns():
    out = subprocess.run([sys.executable, str(BENCH / "cpu_layout.py"), "--sizes", "64,512"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grid = out.stdout.splitlines()[-2:]  # rows N = 64, 512; columns K = 64, 512
    assert [line.split()[0] for line in grid] == ["64", "512"]
    assert [cell.endswith("*") for line in grid for cell in line.split()[1:]] == [False, False, True, False]
    bad = subprocess.run([sys.executable, str(BENCH / "cpu_layout.py"), "--sizes", "64,x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--sizes: expected comma-separated integers, got '64,x'" in bad.stderr


def test_cpu_profile_counts_modules_and_top_level_ops():
    import torch

    import dsv3

    model = dsv3.load_pretrained(dsv3.bundled_model_path(), dtype=torch.float32)
    prompt = torch.arange(3, 11)[None]
    with torch.inference_mode():
        cache = model.new_cache(1, 32)
        tokens = cpu_profile._prefill(model, prompt, cache).argmax(-1)
        modules = cpu_profile.module_times(model, tokens, cache, 8, 2)
        ops = cpu_profile.op_counts(model, tokens, cache, 10, 2)
    c = model.config
    assert modules["Block"][1] == c.num_hidden_layers and modules["MLA"][1] == c.num_hidden_layers
    assert modules["MoE"][1] == c.num_hidden_layers - c.first_k_dense_replace
    assert modules["MLA"][0] < modules["Block"][0]  # inclusive times nest
    # one lm_head projection per step, and the linears counted once at top level (not their inner aten::mm)
    assert ops["aten::linear"][0] >= c.num_hidden_layers * 3 + 1 and "aten::mm" not in ops
    assert not any(h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))  # hooks removed


def test_quant_decode_steps_take_turns_through_each_models_own_cache():
    """bench/quant.py's decode timing: every model prefills into its own cache, then the models take turns at
    every step, the order reversed each step, and each step continues that model's own greedy sequence."""
    import torch

    import quant
    from dsv3 import ModelConfig, Transformer

    torch.manual_seed(0)
    models, log = {}, []
    for name in ("bf16", "int4"):
        model = Transformer(ModelConfig.tiny(num_nextn_predict_layers=0)).eval()
        model.register_forward_pre_hook(
            lambda m, args, name=name: log.append((name, args[0].shape[1], args[2] if len(args) > 2 else 0)))
        models[name] = model
    prompt = torch.randint(2, 1000, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        times = quant.decode_steps(models, prompt, steps=3, rounds=2)
    assert [len(t) for t in times.values()] == [6, 6]
    prompts = [("bf16", 5, 0), ("int4", 5, 0)]
    assert log[:2] == prompts and log[8:10] == prompts  # each round: both prompts first, then 3 steps of 2
    # round 0's steps: (bf16, int4), (int4, bf16), (bf16, int4); round 1 starts reversed
    order = [n for n, T, _ in log if T == 1]
    assert order == ["bf16", "int4", "int4", "bf16", "bf16", "int4", "int4", "bf16", "bf16", "int4", "int4", "bf16"]
    positions = [pos for n, T, pos in log if T == 1 and n == "bf16"]
    assert positions == [5, 6, 7, 5, 6, 7]
