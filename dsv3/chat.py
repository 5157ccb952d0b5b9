"""`dsv3 chat`: talk to a model in the terminal, its answer streamed token by token.

    dsv3 chat [--model DIR] [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--system TEXT]

The conversation is kept as OpenAI-style messages and rendered with the tokenizer's chat template at every turn
(so the model sees the whole dialogue, as a chat server would send it); the answer is decoded incrementally and
cut at the end-of-sentence token. Commands: `/reset` starts a new conversation (keeping the system prompt),
`/exit` or Ctrl-D quits, Ctrl-C interrupts an answer (what was shown so far stays in the conversation).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import torch

from .arguments import REVISION_HELP, device, model_path
from .generation import stream_text
from .sampling import SamplingParams

HELP = "Commands: /reset starts over, /exit (or Ctrl-D) quits, Ctrl-C interrupts an answer."


class ChatSession:
    """A conversation with one model: `reply(text)` streams the assistant's answer and records both turns.

    Sampling follows `dsv3.generate`; with a seed, turn i samples with seed + i, so a whole session replays
    identically while the turns differ.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None,
                 compile: bool = False) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.compile = compile  # generate's compile=True: compiled decode step (CUDA graphs on a GPU), CPU prefill
        self.system = system
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.seed = seed
        SamplingParams(**self.sampling, seed=seed)  # invalid settings fail here, not at the first answer
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the dialogue; keep the system prompt."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's `text`, then yield the answer in pieces; the answer joins the conversation when the
        stream ends or is closed (an interrupted answer is kept as far as it went)."""
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        except ValueError:  # e.g. text that is not Unicode: it must not stay in the conversation
            self.messages.pop()
            raise
        room = self.model.config.max_position_embeddings - len(prompt)
        if room < 1:
            self.messages.pop()
            raise ValueError(f"the conversation ({len(prompt)} tokens) fills the model's context of "
                             f"{self.model.config.max_position_embeddings} tokens; /reset to start over")
        turn = sum(m["role"] == "assistant" for m in self.messages)
        seed = None if self.seed is None else self.seed + turn
        sampling = {**self.sampling, "max_new_tokens": min(self.sampling["max_new_tokens"], room)}
        answer: list[str] = []
        try:
            for piece in stream_text(self.model, self.tokenizer, prompt, seed=seed, compile=self.compile,
                                     **sampling):
                answer.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer)})


COMPILING = "(compiling the decode step: the first answer takes minutes on a CPU, seconds once cached)"


def repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Read-eval-print loop over `session` until /exit or end of input."""
    out.write(HELP + "\n")
    compiled = not session.compile
    while True:
        try:
            line = read(">>> ").strip()
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            session.reset()
            out.write("(new conversation)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}. {HELP}\n")
            continue
        if not compiled:  # torch.compile runs inside the first answer, silently for minutes on a CPU
            out.write(COMPILING + "\n")
            out.flush()
            compiled = True
        pieces = session.reply(line)
        try:
            for piece in pieces:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            pieces.close()
            out.write(" [interrupted]")
        except ValueError as error:
            out.write(f"error: {error}")
        out.write("\n")


def _model_dir(model: str | None, revision: str | None = None) -> Path:
    if model is not None:
        path = model_path(model, revision)
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {path}: no config.json there; expected a checkpoint directory in the hub "
                             "layout with the tokenizer files beside it")
        return path
    import dsv3

    finder = getattr(dsv3, "bundled_model_path", None)
    path = Path(finder()) if finder else None
    if path is None or not (path / "model.safetensors").is_file():
        raise SystemExit("no --model given and this install has no bundled model; pass --model DIR")
    return path


def run(args: argparse.Namespace, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """Load the model and tokenizer of `args.model` (default: the bundled model) and chat."""
    from .checkpoint import load_pretrained
    from .distributed import console, init
    from .distributed import device as distributed_device
    from .tokenizer import Tokenizer, require_unicode

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed)
    try:
        SamplingParams(**sampling)  # before the (slow) load
        if args.system is not None:
            require_unicode(args.system, "--system")
    except ValueError as error:
        raise SystemExit(f"dsv3 chat: {error}") from None
    path = _model_dir(args.model, args.revision)
    if init() > 1:  # torchrun: each rank holds its share of the model; rank 0 has the terminal
        read, out, args.device = console.shared_read(read), console.rank0_output(out), distributed_device()
        sampling["seed"] = console.shared_seed(args.seed)
    model = load_pretrained(path, device=args.device, keep_fp8=args.keep_fp8).eval()
    tokenizer = Tokenizer.from_pretrained(path)
    repl(ChatSession(model, tokenizer, system=args.system, compile=args.compile, **sampling), read, out)
    return 0


def add_cli(subparsers) -> None:
    """Register `dsv3 chat`."""
    p = subparsers.add_parser("chat", help="chat with a model in the terminal (streams its answers)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="DIR", help="checkpoint directory with tokenizer files, or a hub id "
                   "(default: the bundled model)")
    p.add_argument("--revision", help=REVISION_HELP)
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--device", type=device, default="auto",
                   help="torch device: auto (default: cuda when available, else cpu), cpu, cuda:1 ...")
    p.add_argument("--keep-fp8", action="store_true", help="keep an FP8 checkpoint's weights in FP8 (DeepSeek-V3's "
                   "release) instead of dequantising them; under torchrun each rank reads its FP8 slices")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on a GPU) and, on CPU, the prompt's prefill: "
                        "faster replies after a one-off compile of one to three minutes")
    p.set_defaults(func=run)
