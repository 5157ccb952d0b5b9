"""The `dsv3` command line as a user meets it, in subprocesses (`python -m dsv3`, this checkout first on the path).

- MISTAKES: each user mistake exits non-zero with exactly one line on stderr that names the problem, and no
  traceback (each in its own process, forked from one that imported dsv3 once: see FORK_RUNNER).
- A Hugging Face hub id resolves from a prepared local hub cache (HF_HOME, offline) with the bundled model's files.
- Ctrl-C (SIGINT) in `dsv3 train` saves a checkpoint and says to --resume, which continues from it.
- `dsv3 quantize` writes an int4 checkpoint of the bundled model at most 0.6x its bf16 file, files 0644 under umask
  022, that loads back with the in-memory quantized model's logits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3 import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "dsv3" / "bundled"
HUB_ID = "dsv3-test/bundled"  # the name the prepared hub cache holds the bundled model under


def dsv3_env(**extra: str) -> dict:
    """A child's environment: this checkout first on the path, offline, no API key, one torch thread (conftest.py)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
    env.pop("DSV3_API_KEY", None)
    return env


def run_dsv3(args: list[str], cwd: Path, env: dict | None = None, stdin: str = "",
             timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv3", *args], cwd=cwd, env=env or dsv3_env(), input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def make_hub_cache(home: Path, repo_id: str = HUB_ID, commit: str = "0" * 40) -> Path:
    """The layout huggingface_hub's cache uses (HF_HOME/hub/models--org--name/{refs/main, snapshots/<commit>/}),
    holding the bundled model's files, as a download would have left it."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (snapshot / name).symlink_to(BUNDLED / name)
    return home


# ----------------------------------------------------------------------------------------------- user mistakes
# (id, argv, what the one line must say); {d} is the fixture's directory of prepared files, {busy} a port in use
MISTAKES = [
    ("serve-port-range", "serve --port 99999", "--port 99999: expected a port number from 1 to 65535"),
    ("serve-port-busy", "serve --port {busy}", "Address already in use"),
    ("serve-no-gpu", "serve --device cuda:99", "cuda:99: no such CUDA device"),
    ("serve-typo-flag", "serve --prot 8000", "dsv3 serve: error: unrecognized arguments: --prot"),
    ("serve-no-dir", "serve --model {d}/missing", "missing: no such directory"),
    ("serve-hub-not-cached", "serve --model deepseek-ai/DeepSeek-V3",
     "hub id deepseek-ai/DeepSeek-V3 is not in the Hugging Face cache while offline"),
    ("chat-no-gpu", "chat --device cuda:99", "argument --device: cuda:99: no such CUDA device"),
    ("chat-hub-revision", f"chat --model {HUB_ID} --revision v9", "at revision v9 is not in the Hugging Face cache"),
    ("train-config-missing", "train --config {d}/nope.json --data {d}/text.txt --out {d}/run",
     "--config {d}/nope.json: no such file"),
    ("train-config-no-type", "train --config {d}/untyped.json --data {d}/text.txt --out {d}/run",
     "unsupported model_type None"),
    ("train-data-missing", "train --config {d}/tiny.json --data {d}/nope.txt --out {d}/run",
     "--data {d}/nope.txt: no such file"),
    ("train-out-is-file", "train --config {d}/tiny.json --data {d}/text.txt --out {d}/text.txt",
     "--out {d}/text.txt: a file is there"),
    ("train-steps-zero", "train --config {d}/tiny.json --data {d}/text.txt --out {d}/run --steps 0",
     "TrainConfig.steps must be positive"),
    ("train-no-model", "train --data {d}/text.txt --out {d}/empty --resume", "give --config CONFIG.json or --model"),
    ("quantize-scheme", "quantize --model dsv3/bundled --scheme int3 --output {d}/q", "invalid choice: 'int3'"),
    ("quantize-group", "quantize --model dsv3/bundled --scheme int4 --group-size 100 --output {d}/q",
     "argument --group-size: invalid choice: 100"),
    ("finetune-data-missing", "finetune --data {d}/nope.jsonl --output {d}/lora", "--data {d}/nope.jsonl: no such"),
    ("finetune-bad-line", "finetune --data {d}/bad.jsonl --output {d}/lora", "bad.jsonl:2: not valid JSON"),
    ("finetune-rank", "finetune --data data/lora/reply_format.jsonl --output {d}/lora --rank 0",
     "--rank must be at least 1"),
    ("eval-too-many-shots", "eval mmlu --shots 9 --limit 1", "9-shot asked for, but subject"),
    ("eval-output-is-file", "eval mmlu --output {d}/text.txt", "--output {d}/text.txt: a file is there"),
    ("token-no-key", "token create --expires-in 3600", "give --api-key KEY"),
]


# Runs each case in a child forked from one process that has imported dsv3 (and torch, ~1.5 s of CPU a process)
# once; a child ends as `python -m dsv3` would: SystemExit's code or message, else a traceback and status 1.
FORK_RUNNER = """
import json, os, sys, traceback
from dsv3.cli import main
for i, argv in enumerate(json.loads(sys.argv[2])):
    if os.fork() == 0:
        for fd, name, mode in ((0, "in", os.O_RDONLY), (1, "out", os.O_WRONLY), (2, "err", os.O_WRONLY)):
            os.dup2(os.open(os.path.join(sys.argv[1], f"{i}.{name}"), mode | (os.O_CREAT if fd else 0), 0o644), fd)
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
        except BaseException:
            traceback.print_exc()
            code = 1
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code or 0)
    _, status = os.wait()
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """Run every MISTAKES command (cwd: the repository, so README's relative paths hold; stdin: /exit) and collect
    (exit status, stdout, stderr, expected text) by case id."""
    d = tmp_path_factory.mktemp("mistakes")
    (d / "text.txt").write_text("oak (noun): a tree\nfir (noun): a tree\n")
    (d / "tiny.json").write_text(json.dumps(ModelConfig.tiny(vocab_size=8192).to_hf()))
    (d / "untyped.json").write_text(json.dumps({"hidden_size": 64}))
    (d / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    io = tmp_path_factory.mktemp("io")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fill = dict(d=d, busy=busy.getsockname()[1])
        argvs = [case[1].format(**fill).split() for case in MISTAKES]
        for i in range(len(argvs)):
            (io / f"{i}.in").write_text("/exit\n")
        env = dsv3_env(HF_HOME=str(make_hub_cache(d / "hf")))
        runner = subprocess.run([sys.executable, "-c", FORK_RUNNER, str(io), json.dumps(argvs)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
    assert runner.returncode == 0, runner.stderr
    codes = [int(line) for line in runner.stdout.split()]
    return {case[0]: (code, (io / f"{i}.out").read_text(), (io / f"{i}.err").read_text(), case[2].format(**fill))
            for i, (case, code) in enumerate(zip(MISTAKES, codes))}


@pytest.mark.parametrize("case", [case[0] for case in MISTAKES])
def test_mistake_is_one_clear_line(mistakes, case):
    code, _, stderr, expected = mistakes[case]
    lines = stderr.splitlines()
    assert code != 0 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and expected in lines[0], stderr


def test_unknown_flag_shows_the_subcommand_usage(mistakes):
    assert mistakes["serve-typo-flag"][1].startswith("usage: dsv3 serve ")


# ----------------------------------------------------------------------------------------------- hub ids
def test_hub_id_loads_from_a_prepared_offline_cache(tmp_path):
    env = dsv3_env(HF_HOME=str(make_hub_cache(tmp_path / "hf")))
    result = run_dsv3(["chat", "--model", HUB_ID, "--revision", "main", "--max-new-tokens", "3"], tmp_path, env,
                      stdin="oak (noun):\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Commands:") and result.stdout.count(">>> ") == 2


def test_resolve_model_keeps_local_directories():
    from dsv3.checkpoint import CheckpointError, resolve_model

    assert resolve_model(BUNDLED) == BUNDLED
    with pytest.raises(CheckpointError, match="--revision applies to hub ids"):
        resolve_model(BUNDLED, revision="main")


# ----------------------------------------------------------------------------------------------- Ctrl-C in train
def test_sigint_in_train_saves_a_checkpoint_and_resume_continues(tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps(ModelConfig.tiny(vocab_size=8192).to_hf()))
    (tmp_path / "text.txt").write_text("".join(f"word{i} (noun): a gloss of word {i}\n" for i in range(300)))
    out = tmp_path / "run"
    base = [sys.executable, "-m", "dsv3", "train", "--config", "tiny.json", "--data", "text.txt", "--out", "run",
            "--seq-len", "16", "--batch-size", "2", "--log-every", "1", "--eval-fraction", "0", "--no-progress"]
    proc = subprocess.Popen([*base, "--steps", "100000", "--save-every", "0"], cwd=tmp_path, env=dsv3_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    [line] = stderr.splitlines()
    [checkpoint] = list(out.glob("checkpoint-*"))
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert f"SIGINT after step {step}: checkpoint {out.name}/{checkpoint.name} saved" in line and "--resume" in line
    resumed = subprocess.run([*base, "--steps", str(step + 2), "--resume"], cwd=tmp_path, env=dsv3_env(),
                             capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / f"checkpoint-{step + 2:06d}" / "trainer_state.json").read_text())["step"] == step + 2


# ----------------------------------------------------------------------------------------------- quantize
def test_int4_checkpoint_is_small_0644_and_loads_back_with_the_same_logits(tmp_path):
    old = os.umask(0o022)
    try:
        result = run_dsv3(["quantize", "--model", str(BUNDLED), "--scheme", "int4", "--group-size", "128",
                           "--output", str(tmp_path / "int4")], tmp_path)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    written = tmp_path / "int4" / "model.safetensors"
    assert written.stat().st_size <= 0.6 * (BUNDLED / "model.safetensors").stat().st_size
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "int4").iterdir()} == {
        name: 0o644 for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                 "README.md")}
    in_memory = dsv3.quantize(dsv3.load_pretrained(BUNDLED), "int4", 128, pad=True)
    loaded = dsv3.load_pretrained(tmp_path / "int4")
    ids = torch.tensor([dsv3.Tokenizer.from_pretrained(BUNDLED).encode("oak (noun): a tree")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), in_memory(ids), rtol=0, atol=0)


def test_cli_silences_the_no_cuda_runtime_log():
    """inductor imports torch.utils.cpp_extension, whose 'No CUDA runtime is found' warning would land between chat
    prompts on CUDA builds without a GPU; the CLI raises that logger's level."""
    import logging

    from dsv3.cli import main

    assert main(["token", "create", "--api-key", "sk-test"]) == 0
    assert not logging.getLogger("torch.utils.cpp_extension").isEnabledFor(logging.WARNING)


def test_finetune_max_steps_stops_there_with_a_checkpoint(tmp_path, capsys):
    from dsv3.cli import main

    out = tmp_path / "lora"
    assert main(["finetune", "--data", str(ROOT / "data/lora/reply_format.jsonl"), "--output", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--eval-fraction", "0.01", "--no-progress"]) == 0
    [checkpoint] = out.glob("checkpoint-epoch*")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 2) and (out / "adapter_model.safetensors").is_file()
    assert "held-out loss" in capsys.readouterr().out


def test_keep_fp8_flag_keeps_a_deepseek_fp8_checkpoint_in_fp8(tmp_path):
    """`--keep-fp8` (serve, chat, eval mmlu) reaches load_pretrained: on a checkpoint in DeepSeek-V3's FP8 release
    format the served model holds FP8Linear layers with it and plain linears without it; eval mmlu runs with it."""
    import shutil

    from safetensors.torch import save_file
    from server_utils import server_options
    from test_checkpoint import quantize_fp8_blocks

    from dsv3.checkpoint import hub_state_dict
    from dsv3.quant import FP8Linear
    from dsv3.server.cli import build_app

    tensors = hub_state_dict(dsv3.load_pretrained(BUNDLED, dtype=torch.bfloat16))
    for key in list(tensors):  # as DeepSeek ships V3: the projections in e4m3 with 128x128 block scales
        if key.endswith("proj.weight") and not any(s in key for s in ("mlp.gate.", "eh_proj")):
            tensors[key], tensors[key + "_scale_inv"] = quantize_fp8_blocks(tensors[key].float())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = json.loads((BUNDLED / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED / name, tmp_path / name)

    def fp8_layers(**options) -> int:
        model = build_app(server_options(tmp_path, **options)).state.dsv3.engine.model
        return sum(isinstance(m, FP8Linear) for m in model.modules())

    assert fp8_layers(keep_fp8=True) > 0 and fp8_layers() == 0
    result = run_dsv3(["eval", "mmlu", "--model", str(tmp_path), "--limit", "1", "--keep-fp8", "--output",
                       str(tmp_path / "mmlu")], tmp_path)
    assert result.returncode == 0, result.stderr
