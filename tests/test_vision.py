"""The vision path (dsv3/vision): preprocessing, the projector's pixel shuffle, placeholder expansion, the VL
forward against the text model, cached decoding after an image prefill, save/load, config errors, and parity of the
vision tower with transformers' SiglipVisionModel (and of the projector's MLP with DeepseekVLAligner)."""

import io
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dsv3 import ModelConfig, Transformer, save_pretrained
from dsv3.lora import apply_lora
from dsv3.vision import ImageError, VisionConfig, VisionLanguageModel, decode_image, load_vl, save_vl, to_pixels
from dsv3.vision.projector import pixel_shuffle
from dsv3.vision.prompt import expand_images

VOCAB = 128


def tiny_vision(**overrides) -> VisionConfig:
    base = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, image_token_id=VOCAB)
    return VisionConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def vl() -> VisionLanguageModel:
    torch.manual_seed(0)
    lm = Transformer(ModelConfig.tiny(vocab_size=VOCAB, initializer_range=0.1)).eval()
    return VisionLanguageModel(lm, tiny_vision()).eval()


def png(size=(40, 20), colour=(255, 0, 0), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def test_resize_pad_shapes_and_values():
    x = to_pixels(decode_image(png((40, 20))), 32)  # 40x20 -> 32x16, centred with grey above and below
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))       # red inside
    assert torch.allclose(x[:, 0, 16], torch.full((3,), 127 / 127.5 - 1))       # grey pad
    assert to_pixels(Image.new("L", (5, 90)), 32).shape == (3, 32, 32)         # grey-scale, tall


@pytest.mark.parametrize("data, reason", [
    (png()[:60], "corrupt or truncated"), (b"hello", "cannot identify"), (png(fmt="GIF"), "unsupported image format"),
    (png((300, 300)), "too large")])
def test_decode_image_errors(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data, max_pixels=256 * 256)


def test_pixel_shuffle_folds_2x2_blocks():
    grid = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid of patches, one channel: values = patch index
    out = pixel_shuffle(grid, 4, 2)
    assert out.shape == (1, 2, 2, 4)
    assert out[0, 0, 0].tolist() == [0, 1, 4, 5] and out[0, 1, 1].tolist() == [10, 11, 14, 15]


def test_placeholders_match_tokens_per_image(vl):
    config = vl.vision_config
    assert config.tokens_per_image == 2 * 3  # (32/8/2)^2 tokens + one newline per row
    tok = SimpleNamespace(encode=lambda text, add_special_tokens: [ord(c) % 100 for c in text])
    ids = expand_images(tok, "a<image>b<image>", config)
    assert ids.count(config.image_token_id) == 2 * config.tokens_per_image and len(ids) == 2 + 12
    ids_t = torch.tensor([ids])
    emb = vl.embed(ids_t, torch.randn(2, 3, 32, 32))
    assert emb.shape == (1, 14, vl.language_model.config.hidden_size)
    with pytest.raises(ValueError, match="12 image placeholders; expected 6"):
        vl.embed(ids_t, torch.randn(1, 3, 32, 32))


def test_image_embeddings_scale_matches_text(vl):
    """The output norm starts the image tokens at the text embeddings' RMS (not ~60x it)."""
    img = vl.image_embeddings(torch.randn(2, 3, 32, 32))
    text_rms = vl.language_model.model.embed_tokens.weight.pow(2).mean().sqrt()
    ratio = img.pow(2).mean().sqrt() / text_rms
    assert 0.5 < ratio < 2.0


@torch.no_grad()
def test_no_image_forward_equals_text_model(vl):
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(vl(ids), vl.language_model(ids), rtol=0, atol=0)


@torch.no_grad()
def test_cached_decoding_after_image_prefill_equals_full_forward(vl):
    n = vl.vision_config.tokens_per_image
    ids = torch.tensor([[0, 3] + [VOCAB] * n + [7, 9, 11, 4, 20, 21, 22]])
    pixels = torch.randn(1, 3, 32, 32)
    full = vl(ids, pixels)
    lm = vl.language_model
    cache = lm.new_cache(1, 32)
    prompt = 2 + n + 4
    steps = [lm(None, cache, 0, inputs_embeds=vl.embed(ids[:, :prompt], pixels))[:, -1]]
    for pos in range(prompt, ids.shape[1]):
        steps.append(lm(ids[:, pos:pos + 1], cache, pos)[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, prompt - 1:], rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_merges_lora(tmp_path):
    torch.manual_seed(1)
    lm = Transformer(ModelConfig.tiny(vocab_size=VOCAB, initializer_range=0.1))
    lm_dir = tmp_path / "lm"
    save_pretrained(lm, lm_dir, dtype=torch.float32)
    apply_lora(lm, 4, 8.0, ["q_b_proj", "o_proj"], include_mtp=False)
    for name, p in lm.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.1)
    config = tiny_vision(language_model="../lm", lora_rank=4, lora_alpha=8.0, lora_targets=["q_b_proj", "o_proj"])
    model = VisionLanguageModel(lm, config).eval()
    save_vl(model, tmp_path / "vl")
    loaded = load_vl(tmp_path / "vl", dtype=torch.float32)
    ids = torch.tensor([[0, 5] + [VOCAB] * config.tokens_per_image + [6, 7]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixels), model(ids, pixels), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("overrides, message", [
    ({"image_size": 30}, "vision.image_size: expected a multiple of patch_size"),
    ({"patch_size": 0}, "vision.patch_size: expected a positive integer"),
    ({"image_size": 24}, "vision.downsample: expected a divisor"),
    ({"hidden_size": 33}, "vision.hidden_size: expected a multiple of num_attention_heads"),
    ({"lora_targets": "o_proj"}, "vision.lora_targets: expected a list"),
    ({"conv_stem": [8, 0]}, "vision.conv_stem: expected a list of positive channel counts"),
    ({"conv_stem": [4, 4, 4, 4]}, "vision.conv_stem: expected at most as many stride-2 convolutions as patch_size=8"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_vision(**overrides)


def test_config_from_dict_errors(tmp_path):
    with pytest.raises(ValueError, match="vision.patch: unknown field"):
        VisionConfig.from_dict({"patch": 8})
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v3"}')
    with pytest.raises(ValueError, match="no 'vision' section"):
        VisionConfig.from_model_dir(tmp_path)
    lm = Transformer(ModelConfig.tiny(vocab_size=VOCAB))
    with pytest.raises(ValueError, match="vision.image_token_id: 5 is a text token"):
        VisionLanguageModel(lm, tiny_vision(image_token_id=5))


@torch.no_grad()
def test_vision_tower_matches_transformers_siglip(vl):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    c = vl.vision_config
    hf = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, image_size=c.image_size, patch_size=c.patch_size,
        layer_norm_eps=c.layer_norm_eps, vision_use_head=False)).eval()
    for p in vl.vision.parameters():  # non-trivial norms and biases, not their init values
        p.add_(torch.randn_like(p) * 0.05)
    hf.load_state_dict(vl.vision.state_dict())  # the same keys: embeddings.*, encoder.layers.N.*, post_layernorm.*
    pixels = torch.randn(2, 3, c.image_size, c.image_size)
    ours = vl.vision(pixels)
    torch.testing.assert_close(ours, hf(pixel_values=pixels).last_hidden_state, rtol=0, atol=1e-5)
    maps = vl.vision.forward_with_attention(pixels)[1]
    assert len(maps) == c.num_hidden_layers and maps[0].shape == (2, c.num_attention_heads, 16, 16)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, c.num_attention_heads, 16))


@torch.no_grad()
def test_conv_stem_keeps_the_patch_grid():
    """A hybrid ViT: two stride-2 convolutions then a stride-2 patch projection make the same 4 x 4 grid of tokens
    as SigLIP's one stride-8 convolution, and every patch's token depends on its own pixels."""
    vision = VisionLanguageModel(Transformer(ModelConfig.tiny(vocab_size=VOCAB)), tiny_vision(conv_stem=[4, 8])).vision
    assert vision.embeddings.patch_embedding.kernel_size == (2, 2)
    assert [m.out_channels for m in vision.embeddings.stem if isinstance(m, torch.nn.Conv2d)] == [4, 8]
    pixels = torch.randn(2, 3, 32, 32)
    x = vision.embeddings(pixels)
    assert x.shape == (2, 16, 32)
    changed = pixels.clone()
    changed[:, :, 24:, 24:] += 1.0  # the bottom-right patch's pixels
    moved = (vision.embeddings(changed) - x).abs().amax(dim=(0, 2))
    assert moved[15] > 0 and moved[:15].max() == 0


@torch.no_grad()
def test_projector_mlp_matches_transformers_deepseek_vl_aligner(vl):
    from transformers.models.deepseek_vl.modeling_deepseek_vl import DeepseekVLAligner
    c, proj = vl.vision_config, vl.projector
    aligner = DeepseekVLAligner(SimpleNamespace(vision_config=SimpleNamespace(hidden_size=proj.fc1.in_features),
                                                text_config=SimpleNamespace(hidden_size=proj.fc1.out_features)))
    aligner.load_state_dict({"linear1.weight": proj.fc1.weight, "linear1.bias": proj.fc1.bias,
                             "linear2.weight": proj.fc2.weight, "linear2.bias": proj.fc2.bias})
    shuffled = pixel_shuffle(torch.randn(2, c.num_patches, c.hidden_size), c.grid, c.downsample)
    torch.testing.assert_close(proj.mlp(shuffled), aligner(shuffled), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- data and training
def test_vqa_examples_are_seeded_balanced_and_split():
    from dsv3.vision import data

    a, b = data.example(7, "train", 0), data.example(7, "train", 0)
    assert a.image.tobytes() == b.image.tobytes() and (a.question, a.answer) == (b.question, b.answer)
    assert data.example(7, "heldout", 0).image.tobytes() != a.image.tobytes()
    exs = [data.example(i) for i in range(50)]
    assert [e.qtype for e in exs[:5]] == list(data.TYPES) and all(e.image.size == (64, 64) for e in exs)
    assert all(e.answer in data.ANSWERS[e.qtype] and e.question in data.QUESTIONS[e.qtype] for e in exs)
    with pytest.raises(ValueError, match="split: expected 'train' or 'heldout'"):
        data.example(0, "test")


def test_accuracy_by_type_counts_each_type_and_overall():
    from dsv3.vision import data

    exs = [data.example(i) for i in range(7)]  # types in turn: colour, shape, count, position, word, colour, shape
    score = data.accuracy_by_type(exs, [True, False, True, True, False, False, True])
    assert score == {"colour": 0.5, "shape": 0.5, "count": 1.0, "position": 1.0, "word": 0.0, "overall": 4 / 7}
    assert data.accuracy_by_type([], []) == {**{t: 0.0 for t in data.TYPES}, "overall": 0.0}
    with pytest.raises(ValueError):
        data.accuracy_by_type(exs, [True])


def test_training_batch_labels_only_the_answer():
    from dsv3 import Tokenizer, bundled_model_path
    from dsv3.vision import data
    from dsv3.vision.train import AnswerHeads, batch

    tokenizer = Tokenizer.from_pretrained(bundled_model_path())
    config = VisionConfig(image_size=64, patch_size=16, image_token_id=8192)
    exs = [data.example(i) for i in range(3)]
    ids, labels, pixels = batch(tokenizer, exs, config, tokenizer.pad_token_id)
    assert pixels.shape == (3, 3, 64, 64) and (ids == 8192).sum(1).tolist() == [config.tokens_per_image] * 3
    for row, ex in zip(labels.tolist(), exs):
        kept = [t for t in row if t != -100]
        assert kept == tokenizer.encode(ex.answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    heads = AnswerHeads(config.tokens_per_image, 16)
    loss = heads.loss(torch.randn(3, config.tokens_per_image, 16), exs)
    assert loss.ndim == 0 and loss.item() > 0


def test_train_vl_cli_errors(tmp_path, capsys):
    from dsv3.cli import main

    with pytest.raises(SystemExit, match="--steps: expected a positive integer, got 0"):
        main(["train-vl", "--output", str(tmp_path), "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["train-vl", "--output", str(tmp_path), "--conv-stem", "32,x"])
    assert "--conv-stem: expected comma-separated channel counts, got '32,x'" in capsys.readouterr().err


def test_train_vl_stages_checkpoints_and_resume(tmp_path):
    """Every stage runs from the command line: stage 0 logs the heads' probe accuracy, stages 1-2 the model's; the
    examples follow on across the two batch sizes; a resumed run continues at the checkpoint's step."""
    import json
    from types import SimpleNamespace

    from dsv3.cli import main
    from dsv3.vision import data
    from dsv3.vision.train import example_range

    args = SimpleNamespace(stage0_steps=3, stage0_batch_size=4, batch_size=2)
    assert [example_range(s, args) for s in range(5)] == [(0, 4), (4, 4), (8, 4), (12, 2), (14, 2)]
    flags = ["train-vl", "--output", str(tmp_path), "--stage0-steps", "2", "--stage1-steps", "3", "--batch-size", "2",
             "--stage0-batch-size", "4", "--conv-stem", "16", "--lora-rank", "2", "--eval-every", "2",
             "--eval-size", "5", "--save-every", "2", "--resume"]
    assert main(flags + ["--steps", "4"]) == 0
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert main(flags + ["--steps", "5"]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["stage"]) for r in records] == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 2)]
    assert set(records[1]["probe"]) == set(records[3]["heldout"]) == {*data.TYPES, "overall"}
    saved = load_vl(tmp_path / "checkpoint-5", dtype=torch.float32, merge=False)
    assert saved.vision_config.conv_stem == [16] and saved.vision_config.lora_rank == 2


@torch.no_grad()
def test_generate_with_images_equals_greedy_full_forwards(vl):
    from dsv3 import generate

    n = vl.vision_config.tokens_per_image
    ids = torch.tensor([[0, 3] + [VOCAB] * n + [7, 9], [0, 5] + [VOCAB] * n + [8, 2]])
    pixels = torch.randn(2, 3, 32, 32)
    out = generate(vl, ids, 5, images=pixels)
    seq = ids
    for _ in range(5):  # the reference: a full forward over the whole sequence for every new token
        seq = torch.cat([seq, vl(seq, pixels)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    with pytest.raises(ValueError, match="images= needs a vision-language model"):
        generate(vl.language_model, ids.clamp(max=VOCAB - 1), 2, images=pixels)
    with pytest.raises(ValueError, match="image placeholders; expected"):
        generate(vl, ids, 2, images=pixels[:1])


def test_bundled_vl_model_loads_and_sees():
    """The shipped VL model: its config, and held-out accuracy at the issue's 90% target, far above what the blank
    image gets (docs/vision.md: 97.0% against 22.7% on 1000 examples; 100 here, where it scores 98% and 24%)."""
    import dsv3
    from dsv3.vision import data
    from dsv3.vision.train import accuracy

    path = dsv3.bundled_model_path("vl")
    model = load_vl(path, dtype=torch.float32)
    tokenizer = dsv3.Tokenizer.from_pretrained(path)
    assert model.vision_config.language_model == ".." and model.vision_config.tokens_per_image == 6
    assert model.vision_config.conv_stem == [32, 64]
    seen, blind = accuracy(model, tokenizer, 100, seed=0), accuracy(model, tokenizer, 100, seed=0, blank=True)
    assert seen["overall"] >= 0.9 and blind["overall"] <= 0.35
    assert all(seen[t] >= 0.85 for t in data.TYPES), seen
    with pytest.raises(ValueError, match="kind must be 'text' or 'vl'"):
        dsv3.bundled_model_path("audio")
