"""MMLU harness: prompt text, the three data layouts, scoring against a plain forward pass, the server backend,
and agreement with lm-evaluation-harness (`hf` model + lm-eval's own mmlu task yaml) on a tiny random model."""

from __future__ import annotations

import csv
import json
import shutil
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.eval.mmlu import Prediction, parse_letter, run_mmlu, summarize
from dsv3.eval.mmlu_data import SHIPPED_DIR, MMLUDataError, Question, load_mmlu, prompt, subject_prefix
from dsv3.eval.mmlu_scorers import APIScorer, ModelScorer, ServerError
from dsv3.tokenizer import Tokenizer

BUNDLED = Path(dsv3.__file__).parent / "bundled"
COMPARE_SUBJECTS = ["conceptual_physics", "high_school_microeconomics", "human_aging", "world_religions"]



Q1 = Question("college_physics", "  What is 2 + 2?\n", ("3", "4", " 5", "22"), 1)
E1 = Question("college_physics", "Unit of force?", ("newton", "joule", "watt", "pascal"), 0)
E2 = Question("college_physics", "Speed of light is about", ("3e8 m/s", "3e5 m/s", "340 m/s", "1 m/s"), 0)


def test_prompt_zero_shot_is_lm_eval_text():
    assert prompt(Q1, []) == (
        "The following are multiple choice questions (with answers) about college physics.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC.  5\nD. 22\nAnswer:")


def test_prompt_four_shot_is_lm_eval_text():
    shots = [E1, E2, E1, E2]
    e1 = "Unit of force?\nA. newton\nB. joule\nC. watt\nD. pascal\nAnswer: A\n\n"
    e2 = "Speed of light is about\nA. 3e8 m/s\nB. 3e5 m/s\nC. 340 m/s\nD. 1 m/s\nAnswer: A\n\n"
    header = "The following are multiple choice questions (with answers) about college physics.\n\n"
    assert subject_prefix("college_physics", shots) == header + e1 + e2 + e1 + e2
    assert prompt(Q1, shots) == header + e1 + e2 + e1 + e2 + "What is 2 + 2?\nA. 3\nB. 4\nC.  5\nD. 22\nAnswer:"


# ---------------------------------------------------------------------------------------------------- data
ROWS = {"test": [Q1, E2], "validation": [E2], "dev": [E1, E2]}


def _row(q: Question) -> dict:
    return {"question": q.question, "subject": q.subject, "choices": list(q.choices), "answer": q.answer}


def _write_jsonl(root: Path) -> None:
    for split, qs in ROWS.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(_row(q)) + "\n" for q in qs))


def test_jsonl_parquet_and_csv_layouts_load_the_same(tmp_path):
    (tmp_path / "jsonl").mkdir()
    _write_jsonl(tmp_path / "jsonl")
    csv_root = tmp_path / "csv"
    for split, folder in (("test", "test"), ("validation", "val"), ("dev", "dev")):
        (csv_root / folder).mkdir(parents=True)
        with (csv_root / folder / f"college_physics_{folder}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([q.question, *q.choices, "ABCD"[q.answer]] for q in ROWS[split])
    layouts = [tmp_path / "jsonl", csv_root]
    try:
        import pandas as pd
        import pyarrow  # noqa: F401  (parquet engine)
    except ImportError:
        pd = None
    if pd is not None:
        (tmp_path / "parquet").mkdir()
        for split, qs in ROWS.items():
            pd.DataFrame([_row(q) for q in qs]).to_parquet(tmp_path / "parquet" / f"{split}.parquet")
        layouts.append(tmp_path / "parquet")
    for root in layouts:
        data = load_mmlu(root, "test")
        assert data.questions == {"college_physics": [Q1, E2]}, root
        assert data.exemplars == {"college_physics": [E1, E2]}, root
        assert load_mmlu(root, "validation").questions == {"college_physics": [E2]}, root


def test_hub_path_loads_configs_through_datasets(tmp_path):
    """The `datasets.load_dataset(id, subject or "all", split)` path, on a local repo laid out like cais/mmlu."""
    pytest.importorskip("datasets")
    from dsv3.eval.mmlu_data import _load_hub

    anatomy = Question("anatomy", "Bones?", ("206", "12", "1", "0"), 0)
    configs = {"all": {"test": [Q1, E2, anatomy], "dev": [E1, anatomy]},
               "anatomy": {"test": [anatomy], "dev": [anatomy]}}
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, qs in splits.items():
            (tmp_path / config).mkdir(exist_ok=True)
            (tmp_path / config / f"{split}.jsonl").write_text("".join(json.dumps(_row(q)) + "\n" for q in qs))
            card += [f"  - split: {split}", f"    path: {config}/{split}.jsonl"]
    (tmp_path / "README.md").write_text("\n".join(card + ["---", ""]))
    questions, exemplars = _load_hub(str(tmp_path), "test", None)
    assert questions == {"college_physics": [Q1, E2], "anatomy": [anatomy]}
    assert exemplars == {"college_physics": [E1], "anatomy": [anatomy]}
    assert _load_hub(str(tmp_path), "test", ["anatomy"]) == ({"anatomy": [anatomy]}, {"anatomy": [anatomy]})


def test_malformed_rows_name_file_and_line(tmp_path):
    lines = [json.dumps(_row(E1)), json.dumps(_row(E2)), json.dumps({**_row(E1), "answer": 7})]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "dev.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(MMLUDataError, match=r"test\.jsonl:3: 'answer' must be an integer 0-3"):
        load_mmlu(tmp_path, "test")
    (tmp_path / "test.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(MMLUDataError, match=r"dev\.jsonl:2: not valid JSON"):
        load_mmlu(tmp_path, "test")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev.jsonl").unlink()
    (tmp_path / "dev" / "anatomy_dev.csv").write_text('q1,a,b,c,d,A\n"q2",a,b,c,E\n')
    with pytest.raises(MMLUDataError, match=r"anatomy_dev\.csv:2: expected 6 columns"):
        load_mmlu(tmp_path, "test")


def test_empty_subject_and_unknown_subject_are_errors(tmp_path):
    for folder in ("dev", "test"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"anatomy_{folder}.csv").write_text("q,a,b,c,d,B\n")
    (tmp_path / "test" / "virology_test.csv").write_text("")
    with pytest.raises(MMLUDataError, match="'virology' has no test questions"):
        load_mmlu(tmp_path, "test")
    with pytest.raises(MMLUDataError, match=r"no test questions for subject\(s\) \['astronomy'\]"):
        load_mmlu(tmp_path, "test", subjects=["astronomy"])
    with pytest.raises(MMLUDataError, match="not a directory"):
        load_mmlu(tmp_path / "missing", "test")


def test_shipped_subset_and_shot_limit():
    data = load_mmlu()
    assert len(data.questions) == 57 and sum(map(len, data.questions.values())) == 857
    assert {len(e) for e in data.exemplars.values()} == {4}
    assert (SHIPPED_DIR / "SOURCE.md").is_file()
    data.check_shots(4)
    with pytest.raises(MMLUDataError, match="5-shot asked for.*only 4 dev exemplars.*up to --shots 4"):
        data.check_shots(5)
    with pytest.raises(MMLUDataError, match="only the validation split"):
        load_mmlu(None, "test")
    with pytest.raises(MMLUDataError, match="limit must be >= 1"):
        load_mmlu(limit=0)


# ---------------------------------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model saved as an HF-format checkpoint beside the bundled tokenizer."""
    torch.manual_seed(0)
    model = dsv3.Transformer(dsv3.ModelConfig.tiny(vocab_size=8192)).eval()
    path = tmp_path_factory.mktemp("tiny_mmlu")
    dsv3.save_pretrained(model, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED / name, path / name)
    return model, Tokenizer.from_pretrained(path), path


def _reference_loglikelihoods(model, tok, context: str) -> list[float]:
    """No cache, no batching: log p(" X" | context) by encoding context and context + " X" (one token here)."""
    ctx = tok.encode(context)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ctx]))[0, -1].float(), -1)
    return [float(lp[tok.encode(context + f" {x}")[len(ctx):][0]]) for x in "ABCD"]


@pytest.mark.parametrize("batch_size,max_length", [(3, None), (2, 210)])
def test_scorer_matches_a_plain_forward(tiny, batch_size, max_length):
    model, tok, _ = tiny
    data = load_mmlu(None, "validation", subjects=["anatomy"], limit=5)
    prefix = subject_prefix("anatomy", data.exemplars["anatomy"][:2])
    contexts = [prompt(q, data.exemplars["anatomy"][:2]) for q in data.questions["anatomy"]]
    scorer = ModelScorer(model, tok, batch_size=batch_size, max_length=max_length)
    if max_length:  # 3 of the 5 prompts (180-223 tokens) are left-truncated like lm-eval, the others keep the prefix
        with pytest.warns(UserWarning, match="left-truncated"):
            got = scorer.loglikelihoods(prefix, contexts)
        want = []
        for c in contexts:
            ids = tok.encode(c)
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids[-max_length:]]))[0, -1].float(), -1)
            want.append([float(lp[tok.encode(c + f" {x}")[len(ids)]]) for x in "ABCD"])
    else:
        got = scorer.loglikelihoods(prefix, contexts)
        want = [_reference_loglikelihoods(model, tok, c) for c in contexts]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)


def test_subject_in_chunks_reuses_the_prefix_and_scores_the_same(tiny, monkeypatch):
    model, tok, _ = tiny
    data = load_mmlu(None, "validation", subjects=["anatomy", "virology"], limit=5)
    whole = run_mmlu(ModelScorer(model, tok), data, 2, progress=False)
    starts = []  # start_pos of every forward: 0 = a prefix computed from scratch
    forward = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda ids, cache, pos: starts.append(pos) or forward(ids, cache, pos))
    chunked = run_mmlu(ModelScorer(model, tok), data, 2, progress=False, chunk=2)  # 3 chunks per subject
    assert starts.count(0) == 2 and len(starts) == 2 + 6
    torch.testing.assert_close(torch.tensor([p.loglikelihoods for p in chunked]),
                               torch.tensor([p.loglikelihoods for p in whole]), atol=1e-5, rtol=0)


def test_generative_mode_parses_the_first_letter(tiny):
    assert [parse_letter(t) for t in ["B", " (C) because", "Answer: D.", "none", "A B"]] == ["B", "C", "D", None, "A"]
    model, tok, _ = tiny
    data = load_mmlu(None, "validation", subjects=["anatomy"], limit=2)
    preds = run_mmlu(ModelScorer(model, tok), data, shots=1, generative=True, progress=False)
    assert len(preds) == 2 and all(p.loglikelihoods is None and isinstance(p.response, str) for p in preds)
    assert all(p.pred == parse_letter(p.response) for p in preds)


def test_summary_micro_macro_and_stderr():
    def pred(subject, ok):
        return Prediction(subject, "q", ["a", "b", "c", "d"], "A", "A" if ok else "B", [0.0] * 4)

    preds = [pred("anatomy", True)] * 3 + [pred("anatomy", False)] + [pred("virology", False)] * 2
    s = summarize(preds)
    assert s["overall"]["micro"] == pytest.approx(0.5) and s["overall"]["macro"] == pytest.approx(0.375)
    assert s["overall"]["micro_stderr"] == pytest.approx((0.25 / 5) ** 0.5)
    assert s["overall"]["macro_stderr"] == pytest.approx((0.75 * 0.25 / 3) ** 0.5 / 2)
    assert s["subjects"]["anatomy"]["category"] == "other" and s["categories"]["other"]["questions"] == 6


# ---------------------------------------------------------------------------------------------------- server
def test_api_backend_on_dsv3_serve_matches_in_process(tiny):
    """`dsv3 serve`'s /v1/completions (echo + logprobs + max_tokens=0) gives the in-process log-likelihoods."""
    from server_utils import ServerThread

    from dsv3.server import build_app
    from dsv3.server.cli import DEFAULTS

    model, tok, path = tiny
    server = ServerThread(build_app({**DEFAULTS, "model": str(path), "served_model_name": "tiny",
                                     "max_seq_len": 1024, "max_batch": 8}))
    try:
        data = load_mmlu(None, "validation", subjects=["anatomy", "world_religions"], limit=3)
        api = run_mmlu(APIScorer(server.base_url, model="tiny", batch_size=5), data, 1, progress=False)
        generated = run_mmlu(APIScorer(server.base_url, model="tiny"), data, 1, generative=True, progress=False)
        chat = run_mmlu(APIScorer(server.base_url, model="tiny", chat=True), data, 0, generative=True,
                        progress=False, max_new_tokens=3)
    finally:
        server.stop()
    local = run_mmlu(ModelScorer(model, tok), data, 1, progress=False)
    assert [p.pred for p in api] == [p.pred for p in local]
    assert [p.response for p in generated] == [p.response for p in run_mmlu(
        ModelScorer(model, tok), data, 1, generative=True, progress=False)]
    assert [p.response for p in chat] == [p.response for p in run_mmlu(
        ModelScorer(model, tok, chat=True), data, 0, generative=True, progress=False, max_new_tokens=3)]
    torch.testing.assert_close(torch.tensor([p.loglikelihoods for p in api]),
                               torch.tensor([p.loglikelihoods for p in local]), atol=1e-4, rtol=0)


def test_unreachable_server_is_a_clear_error():
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_port
    server.server_close()  # nothing listens there now
    with pytest.raises(ServerError, match=f"cannot reach http://127.0.0.1:{port}/v1/completions"):
        APIScorer(f"http://127.0.0.1:{port}").loglikelihoods("", ["Q\nAnswer:"])


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_writes_predictions_summary_and_csv(tiny, tmp_path, capsys):
    from dsv3.cli import main

    _, _, path = tiny
    assert main(["eval", "mmlu", "--model", str(path), "--subjects", "anatomy", "virology", "--limit", "2",
                 "--shots", "2", "--output", str(tmp_path)]) == 0
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {"subject", "question", "choices", "answer", "pred", "loglikelihoods"} <= set(lines[0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["shots"] == 2 and summary["overall"]["questions"] == 4
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["name"] for r in rows] == ["anatomy", "virology", "other", "overall"]
    out = capsys.readouterr().out
    assert "overall" in out and "chance (4 choices)" in out and "25.0%" in out
    with pytest.raises(SystemExit, match="5-shot asked for"):
        main(["eval", "mmlu", "--model", str(path), "--shots", "5", "--output", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse: "argument --limit: expected an integer >= 1"
        main(["eval", "mmlu", "--model", str(path), "--limit", "0", "--output", str(tmp_path)])
    assert "--limit: expected an integer >= 1, got '0'" in capsys.readouterr().err
    before = {name: (tmp_path / name).read_bytes() for name in ("predictions.jsonl", "summary.json", "results.csv")}
    with pytest.raises(SystemExit, match="already holds an earlier run's predictions.jsonl, summary.json, results"):
        main(["eval", "mmlu", "--model", str(path), "--subjects", "anatomy", "--limit", "1", "--output",
              str(tmp_path)])
    assert before == {name: (tmp_path / name).read_bytes() for name in before}  # the earlier results are kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


# ---------------------------------------------------------------------------------------------------- lm-eval
@pytest.fixture(scope="module")
def hf_lm(tiny):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny[2]), dtype="float32", device="cpu", batch_size=8)


@pytest.mark.parametrize("shots", [0, 4])
def test_predictions_agree_with_lm_eval(tiny, hf_lm, shots, monkeypatch):
    import lm_eval.evaluator

    from dsv3.eval.mmlu_lm_eval import lm_eval_loglikelihoods

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)  # runs `pip list`: seconds, unused
    model, tok, _ = tiny
    data = load_mmlu(None, "validation", subjects=COMPARE_SUBJECTS, limit=10)
    ours = run_mmlu(ModelScorer(model, tok, batch_size=8), data, shots, progress=False)
    theirs = lm_eval_loglikelihoods(hf_lm, data, shots)
    assert len(ours) == len(theirs) == 40
    their_pred = {}
    for p in ours:
        lls, context = theirs[p.subject, p.question]
        q = next(q for q in data.questions[p.subject] if q.question == p.question)
        assert context == prompt(q, data.exemplars[p.subject][:shots])  # lm-eval built exactly our prompt
        their_pred[p.subject, p.question] = "ABCD"[max(range(4), key=lls.__getitem__)]
    agree = sum(p.pred == their_pred[p.subject, p.question] for p in ours) / len(ours)
    assert agree >= 0.99
    acc_ours = sum(p.correct for p in ours) / len(ours)
    acc_theirs = sum(their_pred[p.subject, p.question] == p.answer for p in ours) / len(ours)
    assert abs(acc_ours - acc_theirs) <= 0.005
    torch.testing.assert_close(torch.tensor([p.loglikelihoods for p in ours]),
                               torch.tensor([theirs[p.subject, p.question][0] for p in ours]), atol=1e-4, rtol=0)
