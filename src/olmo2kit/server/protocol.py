"""The request bodies of OpenAI's API that the server takes, and its error object.

Shapes follow OpenAI's API reference (https://platform.openai.com/docs/api-reference): `/v1/completions`
and `/v1/chat/completions`. Fields are strictly typed and unknown ones are refused, as OpenAI does
("Unrecognized request argument supplied"); fields OpenAI has that this server does not implement are
accepted only at their neutral value, so a client never gets a silently different behaviour.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from olmo2kit.inference.batching import MAX_LOGPROBS

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings, as OpenAI allows
COMPLETION_TOKENS = 16  # a completion's max_tokens when it is left out or null, as OpenAI's

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]
StopString = Annotated[str, Field(min_length=1)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None
Penalty = Annotated[float, Field(ge=0.0, le=0.0)]  # only 0: repetition penalties are not implemented


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    temperature: Temperature | None = None  # OpenAI's default, 1
    top_p: TopP | None = None  # OpenAI's default, 1
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: Stop = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None  # not implemented: empty only
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Request):
    # token ids before strings: a long list of ids is then checked once, not first as strings (an error each)
    prompt: str | list[int] | list[list[int]] | list[str]
    max_tokens: Annotated[int, Field(ge=0)] = COMPLETION_TOKENS  # null too (the validator below)
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None  # only equal to n: no server-side ranking
    suffix: Annotated[str, Field(max_length=0)] | None = None  # insertion is not implemented

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _default_when_null(cls, value):
        return COMPLETION_TOKENS if value is None else value  # null is OpenAI's default too, not "no limit"


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class ChatCompletionRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # default: what the context leaves
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
