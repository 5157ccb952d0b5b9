"""MMLU data (Hendrycks et al., ICLR 2021): loading, subject categories, and the lm-eval prompt format.

Three sources give the same `Question`s:
- a Hugging Face dataset id (`cais/mmlu` schema: question, subject, choices[4], answer 0-3), through
  `datasets.load_dataset(id, subject or "all", split=...)`;
- a local directory with one file per split in that schema: `test.jsonl`, `validation.jsonl`, `dev.jsonl` (or `.parquet`);
- a local directory in the original release layout: `dev/ val/ test/` holding headerless `{subject}_{split}.csv`
  files with rows `question, A, B, C, D, answer letter` (hendrycks/test `evaluate.py`).
With no source the subset shipped in `dsv3/data/mmlu/` is used (857 validation questions, 4 dev exemplars per
subject; see its SOURCE.md).

Prompt: lm-eval's `mmlu` task (`lm_eval/tasks/mmlu/default/_default_template_yaml` + the per-subject `description`),
which is the original `evaluate.py` format except for the double space the original puts before the subject:
    "The following are multiple choice questions (with answers) about {subject}.\n\n"
    + k x "{question}\nA. {c0}\nB. {c1}\nC. {c2}\nD. {c3}\nAnswer: {letter}\n\n"   (first k dev rows, in order)
    + "{question}\nA. ...\nD. {c3}\nAnswer:"
questions are `.strip()`ped (as the template's `question.strip()`), choices are not.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

LETTERS = "ABCD"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "mmlu"
SPLITS = ("test", "validation", "dev")
_CSV_DIRS = {"test": "test", "validation": "val", "dev": "dev"}  # split -> folder (and file suffix) of the CSV layout

# hendrycks/test categories.py: subject -> one of the 4 categories. lm-eval differs on one subject: it puts
# anatomy in STEM (lm_eval/tasks/mmlu/_generate_configs.py); we keep the original's "other".
CATEGORIES = {
    "STEM": "abstract_algebra astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
                       "professional_psychology public_relations security_studies sociology us_foreign_policy",
    "other": "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management "
             "marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
SUBJECT_CATEGORY = {s: cat for cat, subjects in CATEGORIES.items() for s in subjects.split()}
SUBJECTS = sorted(SUBJECT_CATEGORY)  # the 57 MMLU subjects


class MMLUDataError(ValueError):
    """Bad or missing MMLU data; the message names the file (and line) or the subject at fault."""


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3 = A..D


@dataclass
class MMLUData:
    """questions[subject]: the split to score; exemplars[subject]: its dev rows, in file order."""

    questions: dict[str, list[Question]]
    exemplars: dict[str, list[Question]]
    source: str

    def check_shots(self, shots: int) -> None:
        """Raise unless every subject has `shots` dev exemplars (the shipped subset has 4 per subject)."""
        if shots < 0:
            raise MMLUDataError(f"shots must be >= 0, got {shots}")
        for subject in self.questions:
            have = len(self.exemplars.get(subject, []))
            if have < shots:
                hint = (" The shipped subset keeps 4 dev exemplars per subject, so it goes up to --shots 4;"
                        " use --data cais/mmlu (5 per subject) for 5-shot." if self.source == "shipped" else "")
                raise MMLUDataError(f"{shots}-shot asked for, but subject {subject!r} has only {have} dev exemplars "
                                    f"in {self.source}.{hint}")


# ---------------------------------------------------------------------------------------------------- prompts
def subject_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(q: Question) -> str:
    """The question block ending in "Answer:" (no trailing space: the letter is scored as " X")."""
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    return f"{q.question.strip()}{options}\nAnswer:"


def subject_prefix(subject: str, exemplars: list[Question]) -> str:
    """Header + solved exemplars: the part of the prompt every question of the subject shares."""
    shots = "".join(f"{format_question(e)} {LETTERS[e.answer]}\n\n" for e in exemplars)
    return subject_header(subject) + shots


def prompt(q: Question, exemplars: list[Question]) -> str:
    return subject_prefix(q.subject, exemplars) + format_question(q)


# ---------------------------------------------------------------------------------------------------- loading
def _question(row: dict, where: str, subject: str | None = None) -> Question:
    """A cais/mmlu-schema row -> Question, or an MMLUDataError naming `where` (file:line) and the field."""
    if not isinstance(row, dict):
        raise MMLUDataError(f"{where}: expected an object with question, subject, choices, answer; got {row!r:.80}")
    subject = subject or row.get("subject")
    question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
    if not isinstance(subject, str) or not subject:
        raise MMLUDataError(f"{where}: 'subject' must be a non-empty string, got {subject!r}")
    if not isinstance(question, str) or not question.strip():
        raise MMLUDataError(f"{where}: 'question' must be a non-empty string, got {question!r:.80}")
    if not isinstance(choices, (list, tuple)) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise MMLUDataError(f"{where}: 'choices' must be a list of 4 strings, got {choices!r:.120}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer <= 3:
        raise MMLUDataError(f"{where}: 'answer' must be an integer 0-3 (A-D), got {answer!r}")
    return Question(subject, question, tuple(choices), answer)


def _read_jsonl(path: Path) -> list[Question]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MMLUDataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append(_question(row, f"{path}:{n}"))
    return out


def _read_parquet(path: Path) -> list[Question]:
    import pandas as pd  # optional dependency (dsv3[data])

    rows = pd.read_parquet(path).to_dict("records")
    return [_question({**r, "choices": list(r.get("choices", ())), "answer": _int(r.get("answer"))},
                      f"{path}: row {n}") for n, r in enumerate(rows, 1)]


def _int(value):
    """numpy integers -> int, anything else unchanged (so the validator reports it)."""
    return int(value) if hasattr(value, "__index__") and not isinstance(value, bool) else value


def _read_csv(path: Path, subject: str) -> list[Question]:
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) != 6 or row[5].strip() not in LETTERS or not row[5].strip():
                raise MMLUDataError(f"{path}:{n}: expected 6 columns 'question,A,B,C,D,answer letter', "
                                    f"got {len(row)} columns ending in {row[-1:]!r:.40}")
            out.append(_question({"question": row[0], "choices": row[1:5], "answer": LETTERS.index(row[5].strip())},
                                 f"{path}:{n}", subject))
    return out


def _by_subject(questions: list[Question]) -> dict[str, list[Question]]:
    out: dict[str, list[Question]] = {}
    for q in questions:
        out.setdefault(q.subject, []).append(q)
    return out


def _load_split_dir(root: Path, split: str) -> dict[str, list[Question]]:
    """One split of a local directory, in either layout."""
    for ext, reader in ((".jsonl", _read_jsonl), (".parquet", _read_parquet)):
        if (root / f"{split}{ext}").is_file():
            return _by_subject(reader(root / f"{split}{ext}"))
    folder = root / _CSV_DIRS[split]
    if folder.is_dir():
        suffix = f"_{_CSV_DIRS[split]}.csv"
        files = sorted(folder.glob(f"*{suffix}"))
        if not files:
            raise MMLUDataError(f"{folder}: no *{suffix} files")
        return {f.name[:-len(suffix)]: _read_csv(f, f.name[:-len(suffix)]) for f in files}
    raise MMLUDataError(f"{root}: no {split}.jsonl, {split}.parquet or {_CSV_DIRS[split]}/*_{_CSV_DIRS[split]}.csv "
                        f"for split {split!r}")


def _load_hub(dataset_id: str, split: str, subjects: list[str] | None) -> tuple[dict, dict]:
    import datasets  # optional dependency (dsv3[data])

    def load(config: str, name: str) -> list[Question]:
        try:
            rows = datasets.load_dataset(dataset_id, config, split=name)
        except Exception as e:  # hub/network/config errors come in many types; keep the cause visible
            raise MMLUDataError(f"{dataset_id!r} is no local directory, and loading it from the hub (config "
                                f"{config!r}, split {name!r}) failed: {e}") from e
        return [_question(dict(r), f"{dataset_id}/{config}/{name} row {n}") for n, r in enumerate(rows, 1)]

    configs = subjects or ["all"]
    questions = {s: qs for c in configs for s, qs in _by_subject(load(c, split)).items()}
    exemplars = {s: qs for c in configs for s, qs in _by_subject(load(c, "dev")).items()}
    return questions, exemplars


def load_mmlu(source: str | Path | None = None, split: str = "validation",
              subjects: list[str] | None = None, limit: int | None = None) -> MMLUData:
    """Load `split` (test / validation / dev) and the dev exemplars from `source`.

    source: None (the shipped subset), a local directory, or a hub dataset id such as "cais/mmlu".
    subjects: keep only these (names as in the data, e.g. "college_physics"); limit: first N questions per subject.
    """
    if split not in SPLITS:
        raise MMLUDataError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and limit < 1:
        raise MMLUDataError(f"limit must be >= 1 question per subject, got {limit}")
    if source is None or (Path(source).is_dir()):
        root = SHIPPED_DIR if source is None else Path(source)
        label = "shipped" if source is None else str(root)
        if source is None and split != "validation":
            raise MMLUDataError(f"the shipped MMLU subset has only the validation split (and dev exemplars), not "
                                f"{split!r}; pass --data cais/mmlu or a local directory for {split!r}")
        questions, exemplars = _load_split_dir(root, split), _load_split_dir(root, "dev")
    elif Path(source).exists() or str(source).startswith((".", "/", "~")):
        raise MMLUDataError(f"{source}: not a directory (expected one holding {split}.jsonl / {split}.parquet, "
                            f"or dev/ val/ test/ CSV folders)")
    else:
        label = str(source)
        questions, exemplars = _load_hub(str(source), split, subjects)
    if subjects:
        unknown = [s for s in subjects if s not in questions]
        if unknown:
            raise MMLUDataError(f"{label}: no {split} questions for subject(s) {unknown}; "
                                f"it has {sorted(questions)[:8]}{' ...' if len(questions) > 8 else ''}")
        questions = {s: questions[s] for s in subjects}
    for subject, qs in questions.items():
        if not qs:
            raise MMLUDataError(f"{label}: subject {subject!r} has no {split} questions")
    if not questions:
        raise MMLUDataError(f"{label}: the {split} split is empty")
    if limit is not None:
        questions = {s: qs[:limit] for s, qs in questions.items()}
    return MMLUData(dict(sorted(questions.items())), exemplars, label)
