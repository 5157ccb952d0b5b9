"""Training data: text -> token stream (cached as .npy) -> packed fixed-length sequences in a seeded, resumable order.

Documents (lines, blank-line paragraphs or whole files of plain text, or rows of a `datasets` dataset) are each
encoded with the tokenizer's special tokens (bos for DeepSeek tokenizers) and followed by eos, then concatenated
into one stream. Sequence i of length L+1 is stream[i·L : i·L + L + 1]: inputs are its first L tokens, targets its
last L, so consecutive sequences share one token and every token is a target exactly once per epoch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import torch

from .atomic import write_file

DocSplit = Literal["line", "paragraph", "file"]


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's content; text that is not UTF-8 is a ValueError naming the file, line and byte."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        before = raw[:e.start].decode("utf-8")  # valid up to the bad byte
        line = len((before + "x").splitlines())  # str.splitlines' line breaks, as the readers count lines
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); expected a UTF-8 file") from None


def read_documents(paths: Sequence[str | Path], doc_split: DocSplit = "line") -> Iterable[str]:
    """Documents of plain UTF-8 text files: each non-empty line, each blank-line-separated paragraph, or each file."""
    if doc_split not in ("line", "paragraph", "file"):
        raise ValueError(f"doc_split must be 'line', 'paragraph' or 'file', got {doc_split!r}")
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        text = read_text(path)
        if doc_split == "file":
            parts = [text]
        elif doc_split == "paragraph":
            parts = text.split("\n\n")
        else:
            parts = text.splitlines()
        yield from (p.strip() for p in parts if p.strip())


def dataset_documents(name: str, split: str = "train", text_column: str = "text", config_name: str | None = None,
                      cache_dir: str | Path | None = None) -> Iterable[str]:
    """Rows of a `datasets` dataset: a hub id, or a local .txt/.json/.jsonl/.csv/.parquet file (loaded by its builder).

    cache_dir: where `datasets` keeps its Arrow files (default: its own cache, ~/.cache/huggingface/datasets).
    """
    import datasets  # optional dependency (the `data` extra)

    builders = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    suffix = Path(name).suffix
    cache = None if cache_dir is None else str(cache_dir)
    if Path(name).is_file() and suffix in builders:
        ds = datasets.load_dataset(builders[suffix], data_files=name, split=split, cache_dir=cache)
    else:
        ds = datasets.load_dataset(name, config_name, split=split, cache_dir=cache)
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {text_column!r}; its columns are {ds.column_names}")
    return (row for row in ds[text_column] if row and row.strip())


def tokenize(documents: Iterable[str], tokenizer) -> np.ndarray:
    """One stream: encode(doc) (bos added by the tokenizer) + eos per document.

    uint16 when the vocabulary fits (half the memory and cache size), else int32.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer.encode(doc))
        ids.append(eos)
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.int32
    return np.asarray(ids, dtype=dtype)


def cached_tokens(cache_dir: str | Path, key: dict, make) -> np.ndarray:
    """`make()` once per distinct `key` (a JSON-able description of sources and tokenizer); later, load the .npy."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"tokens-{digest}.npy"
    if path.is_file():
        return np.load(path)
    tokens = make()
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.save would add .npy to a name without it
            np.save(f, tokens)

    write_file(path, save)
    return tokens


def file_fingerprint(path: str | Path) -> list:
    """What identifies a file's content for the cache without reading it: absolute path, size, mtime."""
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """sha256 over the tokenizer files, so a retrained tokenizer never reuses stale token ids."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = Path(tokenizer_dir) / name
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def load_tokens(*, tokenizer, tokenizer_dir: str | Path, cache_dir: str | Path, files: Sequence[str | Path] = (),
                doc_split: DocSplit = "line", dataset: str | None = None, split: str = "train",
                text_column: str = "text", dataset_config: str | None = None) -> np.ndarray:
    """Token stream of text `files` or of a `datasets` dataset, tokenized once and cached in cache_dir as .npy."""
    if bool(files) == bool(dataset):
        raise ValueError("give exactly one of files or dataset")
    key: dict = {"tokenizer": tokenizer_fingerprint(tokenizer_dir), "doc_split": doc_split}
    if files:
        key["files"] = [file_fingerprint(f) for f in files]
        return cached_tokens(cache_dir, key, lambda: tokenize(read_documents(files, doc_split), tokenizer))
    key["dataset"] = [dataset, dataset_config, split, text_column]
    return cached_tokens(cache_dir, key, lambda: tokenize(
        dataset_documents(dataset, split, text_column, dataset_config), tokenizer))


def split_holdout(tokens: np.ndarray, fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out): the last `fraction` of the stream, rounded to whole sequences, is held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval fraction must be in (0, 1), got {fraction}")
    n_eval = max(1, int(num_sequences(len(tokens), seq_len) * fraction)) * seq_len
    cut = len(tokens) - n_eval - 1
    if cut < seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens are too few to hold out {fraction:.0%} with seq_len {seq_len}")
    return tokens[:cut + 1], tokens[cut:]


def num_sequences(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


class PackedSequences:
    """Fixed-length windows over a 1-D token stream: `seqs[idx] -> LongTensor [len(idx), seq_len + 1]`."""

    def __init__(self, tokens: np.ndarray | torch.Tensor | Sequence[int], seq_len: int) -> None:
        tokens = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"expected a 1-D token stream, got shape {tokens.shape}")
        self.tokens, self.seq_len = tokens, seq_len
        self.offsets = np.arange(seq_len + 1)
        if len(self) == 0:
            raise ValueError(f"{len(tokens)} tokens do not fill one sequence of seq_len {seq_len} (+1 target)")

    def __len__(self) -> int:
        return num_sequences(len(self.tokens), self.seq_len)

    def __getitem__(self, idx: np.ndarray) -> torch.Tensor:
        rows = self.tokens[np.asarray(idx)[:, None] * self.seq_len + self.offsets]
        return torch.from_numpy(rows.astype(np.int64))


class EpochSampler:
    """Sequence indices in a fresh seeded permutation per epoch; position p (sequences consumed) fixes everything.

    Saving `position` in a checkpoint is therefore enough to continue the exact order after `--resume`.
    """

    def __init__(self, num: int, seed: int) -> None:
        self.num, self.seed = num, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num)
        return self._perm

    def indices(self, position: int, count: int) -> np.ndarray:
        """The `count` sequence indices starting at global position `position` (may span an epoch boundary)."""
        out = np.empty(count, dtype=np.int64)
        for j, p in enumerate(range(position, position + count)):
            out[j] = self.permutation(p // self.num)[p % self.num]
        return out
