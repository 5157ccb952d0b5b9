"""Run lm-evaluation-harness's own MMLU task on an `MMLUData`, to cross-check dsv3's harness (tests, bench/mmlu.py).

For each subject a task yaml is written that `include`s lm-eval's installed `tasks/mmlu/default/mmlu_<subject>.yaml`
(so the template, description, few-shot sampler and scoring are lm-eval's, not a copy) and swaps only the data:
`dataset_path: json` over two files, the questions as `test` and the dev exemplars as `dev`. lm-eval is a dev
dependency (`pip install dsv3[dev]`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .mmlu_data import MMLUData, Question


def _row(q: Question) -> dict:
    return {"question": q.question, "subject": q.subject, "choices": list(q.choices), "answer": q.answer}


def write_tasks(data: MMLUData, directory: str | Path) -> list[str]:
    """Write one lm-eval task per subject into `directory`; returns the task names (`local_mmlu_<subject>`)."""
    import lm_eval
    import yaml

    template_dir = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    directory = Path(directory)
    names = []
    for subject, questions in data.questions.items():
        template = template_dir / f"mmlu_{subject}.yaml"
        if not template.is_file():
            raise ValueError(f"lm-eval has no mmlu task for subject {subject!r} ({template} missing)")
        files = {}
        for split, rows in (("test", questions), ("dev", data.exemplars.get(subject, []))):
            files[split] = str(directory / f"{subject}_{split}.jsonl")
            Path(files[split]).write_text("".join(json.dumps(_row(q)) + "\n" for q in rows))
        names.append(f"local_mmlu_{subject}")
        (directory / f"{subject}.yaml").write_text(yaml.safe_dump({
            "include": str(template), "task": names[-1], "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": files}}))
    return names


def lm_eval_loglikelihoods(lm, data: MMLUData, shots: int) -> dict[tuple[str, str], tuple[list[float], str]]:
    """Score `data` with lm-eval model `lm` (e.g. `HFLM(pretrained=DIR)`).

    Returns {(subject, question): ([ll_A, ll_B, ll_C, ll_D], the prompt lm-eval built)}.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        names = write_tasks(data, tmp)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, log_samples=True,
                                      task_manager=TaskManager(include_path=tmp, include_defaults=False),
                                      verbosity="ERROR")
    result = {}
    for subject, name in zip(data.questions, names):
        for sample in out["samples"][name]:
            result[subject, sample["doc"]["question"]] = ([ll for ll, _ in sample["filtered_resps"]],
                                                          sample["arguments"][0][0])
    return result
