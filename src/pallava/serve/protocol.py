"""The OpenAI Chat Completions wire format: request models, error bodies, and messages -> conversation.

Only what the assistant can honour is accepted: text and `image_url` content parts, one choice, no tools.
Anything else is refused with an `APIError` that names the offending field (`param`), so a client sees
an OpenAI-style 4xx instead of a silently ignored option.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from pallava.processing.processor import Turn
from pallava.processing.tokenizer import IMAGE


class APIError(Exception):
    """An error returned to the client as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- request ------------------------------------------------------------------------------------------
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
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    """`POST /v1/chat/completions` body. `temperature` defaults to 0 (greedy), as in the paper's evaluation.

    The server subclasses it with its own `max_tokens` bound (`request_model`), so the OpenAPI schema
    states the limit.
    """

    model: str = ""
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=1, description="one choice per request")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: None = Field(default=None, description="stop sequences are not supported")
    tools: list[dict] | None = Field(default=None, max_length=0, description="tools are not supported")

    @field_validator("stop", "tools", mode="before")
    @classmethod
    def _refuse_unsupported(cls, value: object, info: ValidationInfo) -> None:
        if value:
            raise ValueError(f"'{info.field_name}' is not supported by this server")
        return None


def request_model(max_tokens_limit: int) -> type[ChatCompletionRequest]:
    """The request model with this server's upper bound on `max_tokens` / `max_completion_tokens`."""
    bound = {"default": None, "ge": 1, "le": max_tokens_limit}
    return create_model(
        "ChatCompletionRequest",
        __base__=ChatCompletionRequest,
        max_tokens=(int | None, Field(**bound)),
        max_completion_tokens=(int | None, Field(**bound)),
    )


# --- messages -> conversation -------------------------------------------------------------------------
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def to_conversation(
    messages: list[Message], reserved: list[str], max_images: int
) -> tuple[list[Turn], list[tuple[str, str]]]:
    """OpenAI messages -> (conversation with `<image>` placeholders, [(param, image url)] in order).

    Text containing a reserved token (the image placeholder or a chat-template marker) is refused: it would
    let a client forge turns or image slots.
    """
    conversation: list[Turn] = []
    images: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        content = message.content if message.content is not None else ""
        parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content
        pieces = []
        for number, part in enumerate(parts):
            param = f"messages[{index}].content[{number}]"
            if isinstance(part, ImagePart):  # user messages only, by the schema
                images.append((f"{param}.image_url.url", part.image_url.url))
                pieces.append(IMAGE)
                continue
            for token in reserved:
                if token in part.text:
                    raise APIError(400, f"{param}: text contains the reserved token {token!r}", param=param)
            pieces.append(part.text)
        conversation.append({"role": ROLES[message.role], "content": "\n".join(pieces)})
    if len(images) > max_images:
        raise APIError(
            400,
            f"{len(images)} images in the request; at most {max_images} are allowed",
            param="messages",
            code="too_many_images",
        )
    if conversation[-1]["role"] != "user":
        raise APIError(
            400, "the last message must come from the user", param=f"messages[{len(messages) - 1}].role"
        )
    return conversation, images
