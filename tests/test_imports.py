"""The import graph of dsv3/, read from the source (ast, module- and function-level imports alike): no cycles, the
model core and its I/O import only downwards in docs/layout.md's order, and no module imports another's private
names. The model modules hold the architecture only: no compiler internals (they live in dsv3/fast/), and no
function of 60 lines or more."""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "dsv3"
# config -> layers/rope/cache -> attention (incl. DSA)/moe -> model -> hub I/O -> checkpoint/quant/lora/distributed
# (distributed splits quantized layers too) ->
# tokenizer/sampling/generation/fast; the modules above these (train, engine, eval, server, cli) may import any
LEVELS = {"dsv3.config": 0, "dsv3.atomic": 0, "dsv3.layers": 1, "dsv3.rope": 1, "dsv3.cache": 1,
          "dsv3.attention": 2, "dsv3.dsa": 2, "dsv3.moe": 2, "dsv3.model": 3, "dsv3.hub": 4,
          "dsv3.checkpoint_headers": 4,
          "dsv3.distributed": 5, "dsv3.distributed.init": 5, "dsv3.distributed.layers": 5, "dsv3.distributed.moe": 5,
          "dsv3.distributed.parallelize": 5, "dsv3.distributed.checkpoint": 5, "dsv3.distributed.data_parallel": 5,
          "dsv3.distributed.console": 5, "dsv3.distributed.plan": 5, "dsv3.distributed.quantized": 5,
          "dsv3.checkpoint": 5, "dsv3.lora": 5, "dsv3.lora_format": 5, "dsv3.quant": 5, "dsv3.quant.apply": 5,
          "dsv3.quant.base": 5,
          "dsv3.quant.experts": 5, "dsv3.quant.fp8": 5, "dsv3.quant.int4": 5, "dsv3.quant.int8": 5, "dsv3.arguments": 5,
          "dsv3.tokenizer": 6, "dsv3.sampling": 6, "dsv3.generation": 6, "dsv3.fast": 6, "dsv3.fast.layers": 6,
          "dsv3.fast.layout": 6, "dsv3.fast.matvec": 6, "dsv3.fast.moe": 6, "dsv3.fast.steps": 6, "dsv3.fast.triton_moe": 6,
          "dsv3.vision.config": 0, "dsv3.vision.preprocess": 0, "dsv3.vision.data": 0, "dsv3.vision.encoder": 1,
          "dsv3.vision.prompt": 1, "dsv3.vision.projector": 2, "dsv3.vision.model": 6, "dsv3.vision": 6}
MODEL = ["dsv3.config", "dsv3.layers", "dsv3.rope", "dsv3.cache", "dsv3.attention", "dsv3.dsa", "dsv3.moe",
         "dsv3.model"]
COMPILER = ("torch.compiler", "torch._dynamo", "torch._inductor", "torch.fx", "torch.ops.prims", "is_compiling")
# the command modules share their options through dsv3/arguments.py: none imports the top-level dispatcher
COMMANDS = ["dsv3.chat", "dsv3.train", "dsv3.lora_train", "dsv3.eval.mmlu", "dsv3.quant.cli", "dsv3.server.cli",
            "dsv3.vision.train"]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported dsv3 module, imported name or "")}."""
    out = defaultdict(set)
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                if base and base.startswith("dsv3"):
                    for alias in node.names:
                        target = f"{base}.{alias.name}"
                        out[name].add((target, "") if target in mods else (base, alias.name))
            elif isinstance(node, ast.Import):
                out[name].update((a.name, "") for a in node.names if a.name.startswith("dsv3"))
    return out


MODS = _modules()
IMPORTS = _imports(MODS)
GRAPH = {m: {t for t, _ in IMPORTS[m] if t != m and t in MODS} for m in MODS}


def test_the_graph_is_read():
    assert GRAPH["dsv3.model"] >= {"dsv3.attention", "dsv3.moe", "dsv3.dsa"}
    assert "dsv3.hub" in GRAPH["dsv3.checkpoint"] and "dsv3.hub" in GRAPH["dsv3.quant.apply"]


def test_no_import_cycles():
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(GRAPH[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"
    for m in sorted(MODS):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_model_core_and_io_import_only_downwards():
    wrong = [f"{m} (level {LEVELS[m]}) imports {t} (level {LEVELS.get(t, 'above checkpoint/quant/lora')})"
             for m in LEVELS for t in GRAPH[m] if LEVELS.get(t, 99) > LEVELS[m]]
    assert not wrong, wrong


def test_no_private_names_across_modules():
    wrong = [f"{m} imports {name} from {t}" for m in MODS for t, name in IMPORTS[m]
             if name.startswith("_") and t != m]
    assert not wrong, wrong


def test_no_command_module_imports_the_dispatcher():
    wrong = [m for m in COMMANDS if "dsv3.cli" in GRAPH[m]]
    assert not wrong, wrong


def _dotted(node: ast.AST) -> str:
    """"torch.compiler.is_compiling" for that attribute chain (or a name); "" for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def test_model_modules_use_no_compiler_internals():
    wrong = []
    for m in MODEL:
        for node in ast.walk(ast.parse(MODS[m].read_text())):
            if isinstance(node, ast.Attribute):
                names = [_dotted(node)]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or "", *(a.name for a in node.names)]
            else:
                continue
            wrong += [f"{m}:{node.lineno} {n}" for n in names if any(c in n for c in COMPILER)]
    assert not wrong, wrong


def test_model_functions_are_shorter_than_60_lines():
    long = [f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for m in MODEL
            for node in ast.walk(ast.parse(MODS[m].read_text()))
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 >= 60]
    assert not long, long


def test_importing_dsv3_loads_no_compiler():
    """`import dsv3` (every CLI command's start) loads neither dynamo nor inductor: importing inductor's compile_fx
    alone takes ~2 s here. dsv3/fast imports them inside the functions that compile."""
    import subprocess
    import sys
    code = ("import sys, dsv3; print(sorted(m for m in ('torch._dynamo', 'torch._inductor', "
            "'torch.fx.experimental.symbolic_shapes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
