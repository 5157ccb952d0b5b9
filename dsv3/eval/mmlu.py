"""MMLU evaluation that agrees with lm-evaluation-harness's `mmlu` task: run, aggregate, report, CLI.

    dsv3 eval mmlu --model DIR --shots 4 --output out/             # in-process, shipped subset (validation)
    dsv3 eval mmlu --api-base http://localhost:8000/v1 --data cais/mmlu --split test --shots 5 --output out/

Scoring (lm-eval `output_type: multiple_choice`): the prediction is the argmax over A-D of log p(" X" | prompt);
`--generative` instead lets the model write the answer and takes the first standalone A-D letter (lm-eval's
`mmlu_generative` variant, for chat models and servers without prompt log-probs); with `--chat` the prompt goes in as
one user message (the tokenizer's chat template, or `/v1/chat/completions`).

Aggregation: micro accuracy (over questions; lm-eval's headline `mmlu` acc, `weight_by_size: True`) and macro accuracy
(mean over subjects, `weight_by_size: False`), per category (hendrycks categories.py) and overall. Standard errors:
micro sqrt(p(1-p)/(n-1)) (lm-eval's sample stderr of the mean); macro sqrt(sum_s se_s^2) / S, the question-sampling
noise of a mean over a fixed set of subjects. Chance is 25%; an "always A" scorer reads about 23% on the test split.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ..arguments import REVISION_HELP, device, model_path
from ..atomic import write_file
from . import eval_subparsers
from .mmlu_data import CATEGORIES, LETTERS, SUBJECT_CATEGORY, MMLUData, format_question, load_mmlu, subject_prefix

CHANCE = 0.25


@dataclass
class Prediction:
    subject: str
    question: str
    choices: list[str]
    answer: str  # gold letter
    pred: str | None  # predicted letter (None: a generation without any A-D letter)
    loglikelihoods: list[float] | None  # log p(" A") .. log p(" D"); None in generative mode
    response: str | None = None  # generated text, generative mode only

    @property
    def correct(self) -> bool:
        return self.pred == self.answer


def parse_letter(text: str) -> str | None:
    """The first standalone A-D in a generated answer ("B", " (C) because...", "Answer: D")."""
    match = re.search(r"\b([ABCD])\b", text)
    return match.group(1) if match else None


def run_mmlu(scorer, data: MMLUData, shots: int = 0, generative: bool = False, progress: bool = True,
             max_new_tokens: int = 8, chunk: int = 64) -> list[Prediction]:
    """Score every question of `data` with `scorer` (mmlu_scorers.ModelScorer or APIScorer).

    Subjects go to the scorer in chunks of `chunk` questions (so the tqdm bar moves inside large subjects); the
    in-process scorer keeps the subject's prefix cache across its chunks.
    """
    data.check_shots(shots)
    total = sum(len(qs) for qs in data.questions.values())
    preds: list[Prediction] = []
    with tqdm(total=total, desc=f"MMLU {shots}-shot", unit="q", disable=not progress) as bar:
        for subject, questions, prefix in (
                (s, qs[i:i + chunk], subject_prefix(s, data.exemplars.get(s, [])[:shots]))
                for s, qs in data.questions.items() for i in range(0, len(qs), chunk)):
            contexts = [prefix + format_question(q) for q in questions]
            if generative:
                responses = scorer.generate(prefix, contexts, max_new_tokens)
                scores = [None] * len(questions)
                letters = [parse_letter(r) for r in responses]
            else:
                scores = scorer.loglikelihoods(prefix, contexts)
                responses = [None] * len(questions)
                letters = [LETTERS[max(range(4), key=s.__getitem__)] for s in scores]
            for q, s, letter, r in zip(questions, scores, letters, responses):
                preds.append(Prediction(subject, q.question, list(q.choices), LETTERS[q.answer], letter, s, r))
            bar.update(len(questions))
    return preds


# ---------------------------------------------------------------------------------------------------- aggregation
def _group(accs: dict[str, tuple[int, int]]) -> dict:
    """accs: subject -> (correct, n). Micro and macro accuracy with standard errors."""
    n = sum(t for _, t in accs.values())
    micro = sum(c for c, _ in accs.values()) / n
    per_subject = [(c / t, _stderr(c / t, t)) for c, t in accs.values()]
    return {"subjects": len(accs), "questions": n,
            "micro": micro, "micro_stderr": _stderr(micro, n),
            "macro": sum(a for a, _ in per_subject) / len(per_subject),
            "macro_stderr": math.sqrt(sum(se * se for _, se in per_subject)) / len(per_subject)}


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def summarize(preds: list[Prediction]) -> dict:
    """{"overall": group, "categories": {name: group}, "subjects": {name: {category, questions, correct, acc, stderr}}}."""
    if not preds:
        raise ValueError("no predictions to summarize")
    counts: dict[str, tuple[int, int]] = {}
    for p in preds:
        c, n = counts.get(p.subject, (0, 0))
        counts[p.subject] = (c + p.correct, n + 1)
    subjects = {s: {"category": SUBJECT_CATEGORY.get(s, "other"), "questions": n, "correct": c, "acc": c / n,
                    "stderr": _stderr(c / n, n)} for s, (c, n) in counts.items()}
    categories = {}
    for cat in CATEGORIES:
        members = {s: v for s, v in counts.items() if subjects[s]["category"] == cat}
        if members:
            categories[cat] = _group(members)
    return {"overall": _group(counts), "categories": categories, "subjects": subjects, "chance": CHANCE}


def format_report(summary: dict, title: str) -> str:
    lines = [title, f"{'':18}{'subjects':>9}{'questions':>10}   {'micro acc ± se':>16}   {'macro acc ± se':>16}"]
    rows = list(summary["categories"].items()) + [("overall", summary["overall"])]
    for name, g in rows:
        lines.append(f"{name:18}{g['subjects']:>9}{g['questions']:>10}   "
                     f"{100 * g['micro']:>8.1f}% ± {100 * g['micro_stderr']:4.1f}   "
                     f"{100 * g['macro']:>8.1f}% ± {100 * g['macro_stderr']:4.1f}")
    lines.append(f"{'chance (4 choices)':38}   {100 * CHANCE:>8.1f}%")
    return "\n".join(lines)


RESULT_FILES = ("predictions.jsonl", "summary.json", "results.csv")


def write_results(output: str | Path, preds: list[Prediction], summary: dict, config: dict) -> None:
    """output/predictions.jsonl (one line per question), summary.json (config + summary), results.csv."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "predictions.jsonl", lambda tmp: tmp.write_text(
        "".join(json.dumps({**asdict(p), "correct": p.correct}, ensure_ascii=False) + "\n" for p in preds),
        encoding="utf-8"))
    write_file(out / "summary.json", lambda tmp: tmp.write_text(json.dumps({"config": config, **summary}, indent=2)
                                                                + "\n"))
    write_file(out / "results.csv", lambda tmp: _write_csv(tmp, summary))


def _write_csv(path: Path, summary: dict) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["level", "name", "category", "subjects", "questions", "acc_micro", "stderr_micro",
                    "acc_macro", "stderr_macro"])
        for s, v in summary["subjects"].items():
            w.writerow(["subject", s, v["category"], 1, v["questions"], v["acc"], v["stderr"], v["acc"], v["stderr"]])
        for name, g in list(summary["categories"].items()) + [("overall", summary["overall"])]:
            w.writerow(["category" if name != "overall" else "overall", name, name if name != "overall" else "",
                        g["subjects"], g["questions"], g["micro"], g["micro_stderr"], g["macro"], g["macro_stderr"]])


# ---------------------------------------------------------------------------------------------------- CLI
def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def add_cli(subparsers) -> None:
    p = eval_subparsers(subparsers).add_parser(
        "mmlu", help="MMLU accuracy, scored as lm-evaluation-harness's mmlu task",
        description="MMLU accuracy of a dsv3 model or an OpenAI-compatible server, prompted and scored as\n"
                    "lm-evaluation-harness's mmlu task (log-likelihood of ' A' .. ' D').\n"
                    "Writes predictions.jsonl, summary.json and results.csv into --output.",
        epilog="examples:\n" + "\n".join(__doc__.split("\n\n")[1].splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="dsv3 checkpoint directory or hub id (default: the bundled model)")
    p.add_argument("--revision", help=REVISION_HELP)
    src.add_argument("--api-base", metavar="URL", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--api-model", default="dsv3", help="model name sent to the server (default: dsv3)")
    p.add_argument("--api-key", default=None, help="bearer token for the server (default: $OPENAI_API_KEY)")
    p.add_argument("--data", metavar="DIR|ID", default=None,
                   help="local directory (cais/mmlu .jsonl/.parquet per split, or dev/ val/ test/ CSVs) or a hub "
                        "dataset id like cais/mmlu (default: the shipped subset: 857 validation questions, 4 shots max)")
    p.add_argument("--split", choices=["test", "validation"], default=None,
                   help="default: validation for the shipped subset, test otherwise")
    p.add_argument("--shots", type=_count(0), default=0, help="dev exemplars per prompt (default 0, as lm-eval)")
    p.add_argument("--output", metavar="DIR",
                   help="directory for the result files (default: runs/mmlu-YYYYMMDD-HHMMSS, new for each run)")
    p.add_argument("--subjects", nargs="+", default=None, help="only these subjects (e.g. college_physics)")
    p.add_argument("--limit", type=_count(1), default=None, help="first N questions per subject (as lm-eval --limit)")
    p.add_argument("--batch-size", type=_count(1), default=16, help="sequences per forward / prompts per request")
    p.add_argument("--generative", action="store_true",
                   help="let the model write the answer (first A-D letter counts) instead of comparing log-likelihoods")
    p.add_argument("--chat", action="store_true",
                   help="with --generative: send the prompt as a user message (chat template; /v1/chat/completions)")
    p.add_argument("--max-new-tokens", type=_count(1), default=8, help="answer length in generative mode (default 8)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="in-process model dtype")
    p.add_argument("--device", type=device, default="auto",
                   help="in-process model device: auto (default: cuda when available, else cpu), cpu, cuda:1 ...")
    p.add_argument("--keep-fp8", action="store_true", help="keep an FP8 checkpoint's weights in FP8 (DeepSeek-V3's "
                   "release) instead of dequantising them; under torchrun each rank reads its FP8 slices")
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="LoRA adapter (PEFT format, e.g. from dsv3 finetune) merged into the in-process model")
    p.set_defaults(func=_main)


def _model_scorer(args):
    import torch

    from ..checkpoint import load_pretrained
    from ..distributed import device as distributed_device
    from ..distributed import init
    from ..tokenizer import Tokenizer
    from .mmlu_scorers import ModelScorer

    if args.model is None:
        from .. import bundled_model_path
        try:
            path = bundled_model_path()
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}; or pass --model DIR / --api-base URL") from None
    else:
        path = model_path(args.model, args.revision)
    if init() > 1:  # torchrun: each rank holds its share of the model and scores every question with it
        args.device = distributed_device()
    model = load_pretrained(path, dtype=getattr(torch, args.dtype), device=args.device, keep_fp8=args.keep_fp8)
    if args.adapter:
        from ..lora import AdapterError, load_adapter
        try:
            load_adapter(model, args.adapter, merge=True)
        except AdapterError as e:
            raise SystemExit(f"error: --adapter: {e}") from None
    label = f"{path} + adapter {args.adapter}" if args.adapter else str(path)
    return ModelScorer(model, Tokenizer.from_pretrained(path), args.batch_size, chat=args.chat), label


def _main(args) -> int:
    from .mmlu_data import MMLUDataError
    from .mmlu_scorers import ServerError

    try:
        return _evaluate(args)
    except (MMLUDataError, ServerError) as e:
        raise SystemExit(f"error: {e}") from None


def _evaluate(args) -> int:
    import os

    from ..distributed import rank
    from .mmlu_scorers import APIScorer

    if args.chat and not args.generative:
        raise SystemExit("error: --chat needs --generative (chat answers are parsed, not scored by log-likelihood)")
    output = Path(args.output or time.strftime("runs/mmlu-%Y%m%d-%H%M%S"))
    if output.exists() and not output.is_dir():
        raise SystemExit(f"error: --output {output}: a file is there; expected a directory")
    split = args.split or ("validation" if args.data is None else "test")
    data = load_mmlu(args.data, split, args.subjects, args.limit)
    data.check_shots(args.shots)
    if args.api_base and args.adapter:
        raise SystemExit("error: --adapter applies to an in-process model; a server loads it with serve --adapter")
    earlier = [name for name in RESULT_FILES if (output / name).exists()]
    if earlier:  # checked before the scoring (hours on the full test set), not after
        raise SystemExit(f"error: --output {output} already holds an earlier run's {', '.join(earlier)}; choose a new "
                         "directory (without --output each run gets its own)")
    if args.api_base:
        scorer = APIScorer(args.api_base, args.api_model, args.api_key or os.environ.get("OPENAI_API_KEY"),
                           batch_size=args.batch_size, chat=args.chat)
        model_label = f"{args.api_model} @ {scorer.url}"
    else:
        scorer, model_label = _model_scorer(args)
    main = rank() == 0  # under torchrun every rank scores (the model is split), rank 0 reports
    preds = run_mmlu(scorer, data, args.shots, args.generative, progress=main, max_new_tokens=args.max_new_tokens)
    if not main:
        return 0
    summary = summarize(preds)
    config = {"model": model_label, "data": data.source, "split": split, "shots": args.shots, "limit": args.limit,
              "mode": ("chat " if args.chat else "") + ("generative" if args.generative else "loglikelihood"),
              "questions": len(preds)}
    write_results(output, preds, summary, config)
    print(format_report(summary, f"MMLU {split} ({data.source}), {args.shots}-shot, "
                                 f"{config['mode']}, model {model_label}"))
    print(f"wrote {output}/predictions.jsonl, summary.json, results.csv")
    return 0
