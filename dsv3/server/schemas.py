"""Request bodies of the OpenAI API as the openai SDK, LangChain and lm-eval send them (pydantic, extra="allow").

Unknown fields are accepted and ignored, as vLLM does; fields the model cannot honour (image parts, tools,
JSON modes, suffix) are rejected with a 400 that says so rather than silently dropped. Field list:
docs/openai-api.md §1.2, §1.3, §2; vLLM's extras `top_k`, `repetition_penalty`, `stop_token_ids`,
`ignore_eos`, `min_p` come through `extra_body`.

Every number is checked here, so a request the engine cannot sample from is a 400 naming its field: floats must be
finite (a NaN temperature is "not a finite number", not "greater than 2"), and strings must be encodable text (a
lone surrogate, which JSON's \\ud800 escapes can carry, is refused rather than failing later as UTF-8). Bounds that
depend on the served model (top_k and token ids against the vocabulary, lengths against the context) are checked
in common.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..sampling import REPETITION_PENALTY_MAX, REPETITION_PENALTY_MIN


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


def Number(default=None, **bounds):
    """A float field that must be finite and within `bounds` (pydantic's ge/gt/le/lt)."""
    return Field(default, allow_inf_nan=False, **bounds)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """What every 4xx/5xx answers (OpenAI's shape), for the OpenAPI document."""

    error: ErrorDetail


class StreamOptions(_Open):
    include_usage: bool = False


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[Text, list[dict[str, Any]], None] = None
    name: Text | None = None


class _Sampling(_Open):
    """Fields shared by chat and legacy completions."""

    model: Text
    temperature: float | None = Number(ge=0, le=2)
    top_p: float | None = Number(gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 = off; at most the vocabulary (common.py)
    min_p: float | None = Number(ge=0, le=1)
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=0)
    stop: Union[Text, Annotated[list[Text], Field(max_length=16)], None] = None
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    presence_penalty: float | None = Number(ge=-2, le=2)
    frequency_penalty: float | None = Number(ge=-2, le=2)
    repetition_penalty: float | None = Number(ge=REPETITION_PENALTY_MIN, le=REPETITION_PENALTY_MAX)
    logit_bias: dict[str, Annotated[float, Field(allow_inf_nan=False)]] | None = Field(None, max_length=300)
    seed: int | None = Field(None, ge=-2**63, lt=2**64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: Text | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None


class CompletionRequest(_Sampling):
    prompt: Union[Text, list[Text], list[int], list[list[int]]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: Text | None = None
    best_of: int | None = Field(None, ge=1)
