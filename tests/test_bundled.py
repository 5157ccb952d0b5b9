"""The bundled model: present, within its size budget, and identical in dsv3 and transformers."""

import json
from pathlib import Path

import pytest
import torch

import dsv3

ROOT = Path(__file__).resolve().parent.parent


def test_bundled_files_and_size():
    path = dsv3.bundled_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size < 25 * 2**20
    shipped = dsv3.ModelConfig.from_hf(path)
    assert shipped == dsv3.ModelConfig.from_hf(ROOT / "scripts" / "bundled" / "config.json")
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_bundled_loads_in_transformers_with_same_logits():
    transformers = pytest.importorskip("transformers")
    path = dsv3.bundled_model_path()
    ours = dsv3.load_pretrained(path, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok, hf_tok = dsv3.Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    text = "oak (noun): a deciduous tree of the genus Quercus; \"an oak leaf\""
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        a, b = ours(x), theirs(x).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    assert len(ours.mtp) == 1  # the MTP module ships and loads
