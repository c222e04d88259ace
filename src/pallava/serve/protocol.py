"""The OpenAI Chat Completions wire format: request models, error bodies, and messages -> conversation.

Only what the assistant can honour is accepted: text and `image_url` content parts, one choice, no tools.
Anything else is refused with an `APIError` that names the offending field (`param`), so a client sees
an OpenAI-style 4xx instead of a silently ignored option.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    ValidationInfo,
    create_model,
    field_validator,
)

from pallava.processing.processor import Turn
from pallava.processing.tokenizer import IMAGE

# Below this a positive temperature overflows the logits (1e-300 divides them to inf): 0 means greedy.
MIN_TEMPERATURE = 1e-3
_OBJECT_REPR = re.compile(r"<([^<>]*?) at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f...>"


class APIError(Exception):
    """An error returned to the client as `{"error": {"message", "type", "param", "code"}}` (`code` never
    null)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None, code: str) -> dict:
    """The OpenAI error body. Object reprs lose their heap address, and text that is not valid Unicode (a
    lone surrogate echoed from the request) is escaped, so the body always encodes as UTF-8 JSON."""
    param = None if param is None else _printable(param)
    return {"error": {"message": _printable(message), "type": type, "param": param, "code": code}}


def _printable(text: str) -> str:
    text = _OBJECT_REPR.sub(r"<\1>", text)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def unicode_problem(text: str) -> str | None:
    """Why `text` cannot be tokenised (a lone surrogate, which JSON escapes allow), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"the text is not valid Unicode (a lone surrogate at character {error.start})"
    return None


# --- request ------------------------------------------------------------------------------------------
def _json_integer(value: object) -> object:
    """JSON integers only (2.0 included, as JSON Schema has it): pydantic would read `true` as 1 and "4" as
    4."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"expected an integer, got {json.dumps(value)}")
    return value


def json_int(**bounds: int) -> object:
    """An optional integer field type with `Field` bounds (which come first, or the schema loses them)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_json_integer)] | None


class _Lenient(BaseModel):
    """Unknown fields are ignored, as newer OpenAI clients send options older servers do not know."""

    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str = Field(description="a data: URL (base64); a relative path only when the server allows a folder")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class SystemMessage(_Lenient):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Lenient):
    role: Literal["user"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)]
    name: str | None = None


class AssistantMessage(_Lenient):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Lenient):
    """`POST /v1/chat/completions` body. `temperature` defaults to 0 (greedy), as in the paper's evaluation.

    The server subclasses it with its own `max_tokens` bound (`request_model`), so the OpenAPI schema
    states the limit.
    """

    model: str = ""
    messages: list[Message] = Field(min_length=1)
    max_tokens: json_int(ge=1) = None
    max_completion_tokens: json_int(ge=1) = None
    temperature: StrictFloat | None = Field(
        default=None, ge=0, le=2, description=f"0 (greedy) or from {MIN_TEMPERATURE:g} to 2"
    )
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1)
    n: json_int(ge=1, le=1) = Field(default=None, description="one choice per request")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: None = Field(default=None, description="stop sequences are not supported")
    tools: list[dict] | None = Field(default=None, max_length=0, description="tools are not supported")

    @field_validator("stop", "tools", mode="before")
    @classmethod
    def _refuse_unsupported(cls, value: object, info: ValidationInfo) -> None:
        if value:
            raise ValueError(f"'{info.field_name}' is not supported by this server")
        return None

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampled(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {value:g}")
        return value


def request_model(max_tokens_limit: int) -> type[ChatCompletionRequest]:
    """The request model with this server's upper bound on `max_tokens` / `max_completion_tokens`."""
    bounded = json_int(ge=1, le=max_tokens_limit)
    return create_model(
        "ChatCompletionRequest",
        __base__=ChatCompletionRequest,
        max_tokens=(bounded, None),
        max_completion_tokens=(bounded, None),
    )


# --- messages -> conversation -------------------------------------------------------------------------
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def to_conversation(
    messages: list[Message], reserved: list[str], max_images: int, max_chars: int | None = None
) -> tuple[list[Turn], list[tuple[str, str]]]:
    """OpenAI messages -> (conversation with `<image>` placeholders, [(param, image url)] in order).

    Checked before anything is tokenised: the text's length (over `max_chars` it cannot fit the context),
    valid Unicode, and reserved tokens (the image placeholder or a chat-template marker), which would let a
    client forge turns or image slots.
    """
    parts = [
        (index, number, part)
        for index, message in enumerate(messages)
        for number, part in enumerate(_parts(message.content))
    ]
    chars = sum(len(part.text) for _, _, part in parts if isinstance(part, TextPart))
    if max_chars is not None and chars > max_chars:
        raise APIError(
            400,
            f"the messages hold {chars:,} characters of text; no prompt over {max_chars:,} characters "
            "fits the model's context",
            param="messages",
            code="context_length_exceeded",
        )
    pieces: list[list[str]] = [[] for _ in messages]
    images: list[tuple[str, str]] = []
    for index, number, part in parts:
        param = f"messages[{index}].content[{number}]"
        if isinstance(part, ImagePart):  # user messages only, by the schema
            images.append((f"{param}.image_url.url", part.image_url.url))
            pieces[index].append(IMAGE)
            continue
        problem = unicode_problem(part.text)
        if problem:
            raise APIError(400, f"{param}: {problem}", param=param, code="invalid_text")
        for token in reserved:
            if token in part.text:
                raise APIError(
                    400,
                    f"{param}: text contains the reserved token {token!r}",
                    param=param,
                    code="reserved_token",
                )
        pieces[index].append(part.text)
    if len(images) > max_images:
        raise APIError(
            400,
            f"{len(images)} images in the request; at most {max_images} are allowed",
            param="messages",
            code="too_many_images",
        )
    if messages[-1].role != "user":
        param = f"messages[{len(messages) - 1}].role"
        raise APIError(400, "the last message must come from the user", param=param, code="invalid_request")
    conversation = [
        {"role": ROLES[m.role], "content": "\n".join(p)} for m, p in zip(messages, pieces, strict=True)
    ]
    return conversation, images


def _parts(content: str | list | None) -> list[TextPart | ImagePart]:
    return (
        [TextPart(type="text", text=content or "")]
        if content is None or isinstance(content, str)
        else content
    )
