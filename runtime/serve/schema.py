"""The request bodies the server accepts (pydantic, unknown fields refused) and what they become.

    ChatRequest.messages  [system?] (user, assistant)* user
        --plan_chat--> ChatPlan: system text, past turns (question, image, answer), this question
    image_url parts: data: URIs (http(s) only with --allow-remote-images; never local paths)

OpenAI's parameters this model cannot honour (n > 1, logprobs, penalties != 0, tools) are refused with
400 naming the parameter, rather than silently ignored. Fields that change nothing here are accepted:
`tool_choice` "none" (or "auto" without tools), `parallel_tool_calls`, `service_tier`, `user`, `store`,
`metadata`. llama-server's extensions are accepted too: `top_k`, `min_p`, `repeat_penalty`, `n_predict`,
`cache_prompt` (the KV cache is always reused), `grammar` (GBNF), a top-level `json_schema` and
`response_format: {"type": "json_object", "schema": ...}`.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError
from ..sampling import SamplingConfig
from .errors import BadRequest, PayloadTooLarge


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str  # a bare URL string, as some clients send

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None
    refusal: str | None = None


class JSONSchemaFormat(_Strict):
    name: str | None = None  # OpenAI requires it; llama-server clients often leave it out
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama-server's spelling

    @classmethod
    def of_schema(cls, schema: dict[str, Any] | None) -> ResponseFormat:
        """json_object (schema None) or json_schema: what `format` / `json_schema` fields map to."""
        if schema is None:
            return cls(type="json_object")
        spec = JSONSchemaFormat.model_validate({"name": "schema", "schema": schema})
        return cls(type="json_schema", json_schema=spec)

    def normalized(self) -> ResponseFormat | None:
        """None for text; llama-server's `{"type": "json_object", "schema": S}` as json_schema S."""
        if self.type == "text":
            return None
        if self.schema_ is not None and (self.json_schema is None or self.json_schema.schema_ is None):
            return ResponseFormat.of_schema(self.schema_)
        return self


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    n: int | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    # known OpenAI parameters accepted only at their neutral value
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    # accepted, changing nothing for this model (no tools; one service tier)
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    # llama-server's extensions
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)
    n_predict: int | None = Field(default=None, ge=-1)
    cache_prompt: bool | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None


class EmbeddingRequest(_Strict):
    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None
    user: str | None = None


def parse(model: type[BaseModel], data: object) -> Any:
    """Validate a request body; the first problem as a 400 naming the parameter."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
            raise BadRequest(msg, param, "unknown_parameter") from None
        raise BadRequest(f"{param}: {err['msg']}", param, "invalid_value") from None


# -- images ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteImage:
    """An http(s) image URL, fetched only when the server allows remote images."""

    url: str


ImageRef = bytes | RemoteImage


def image_ref(url: str, allow_remote: bool, max_bytes: int, param: str) -> ImageRef:
    """An `image_url.url` -> the image's bytes (data: URI) or a RemoteImage to fetch; else 400."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        head, comma, payload = url[5:].partition(",")
        if not comma:
            raise BadRequest(
                f"{param}: a data: URI needs a ',' before its payload", param, "invalid_image_url"
            )
        if len(payload) * 3 // 4 > max_bytes:
            raise PayloadTooLarge(f"{param}: the image is over {max_bytes} bytes", param, "image_too_large")
        if head.lower().endswith(";base64"):
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                raise BadRequest(
                    f"{param}: bad base64 in the data: URI ({e})", param, "invalid_base64"
                ) from None
        return urllib.parse.unquote_to_bytes(payload)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise BadRequest(
                f"{param}: remote image URLs are off on this server (start it with --allow-remote-images); "
                "send the image as a data: URI",
                param,
                "remote_images_disabled",
            )
        return RemoteImage(url)
    raise BadRequest(
        f"{param}: expected a data: URI (or http(s) with --allow-remote-images), got {url[:40]!r}; "
        "local paths are never read",
        param,
        "invalid_image_url",
    )


# -- chat plans -----------------------------------------------------------------------------------


@dataclass
class PastTurn:
    question: str
    image: ImageRef | None
    answer: str


@dataclass
class ChatPlan:
    system: str | None  # None: the model's own system prompt
    history: list[PastTurn]
    question: str
    image: ImageRef | None
    sampling: SamplingConfig
    stop: list[str] = field(default_factory=list)
    response_format: ResponseFormat | None = None
    grammar: str | None = None  # GBNF (llama-server's `grammar`)
    stream: bool = False
    include_usage: bool = False


def _unsupported(req: ChatRequest) -> None:
    neutral = {
        "n": (None, 1),
        "frequency_penalty": (None, 0, 0.0),
        "presence_penalty": (None, 0, 0.0),
        "logprobs": (None, False),
        "top_logprobs": (None, 0),
    }
    for name, ok in neutral.items():
        if getattr(req, name) not in ok:
            raise BadRequest(
                f"{name}={getattr(req, name)!r} is not supported by this server", name, "unsupported"
            )
    if req.logit_bias:
        raise BadRequest("logit_bias is not supported by this server", "logit_bias", "unsupported")


def _text(content, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if any(isinstance(p, ImagePart) for p in content):
        raise BadRequest(f"{param}: only user messages may carry images", param, "invalid_value")
    return "\n".join(p.text for p in content)


def _user(msg: Message, i: int, allow_remote: bool, max_bytes: int) -> tuple[str, ImageRef | None]:
    param = f"messages.{i}.content"
    if msg.content is None or isinstance(msg.content, str):
        return msg.content or "", None
    texts = [p.text for p in msg.content if isinstance(p, TextPart)]
    urls = [(j, p.url) for j, p in enumerate(msg.content) if isinstance(p, ImagePart)]
    if len(urls) > 1:
        raise BadRequest(
            f"{param}: at most one image per user message (the template has one slot), got {len(urls)}",
            param,
            "too_many_images",
        )
    image = None
    if urls:
        j, url = urls[0]
        image = image_ref(url, allow_remote, max_bytes, f"{param}.{j}.image_url.url")
    return "\n".join(texts), image


def plan_chat(
    req: ChatRequest, default: SamplingConfig, allow_remote: bool, max_image_bytes: int
) -> ChatPlan:
    """Check a chat request against what the model can do and lay it out as turns."""
    _unsupported(req)
    msgs = list(req.messages)
    system = None
    if msgs and msgs[0].role in ("system", "developer"):
        system = _text(msgs.pop(0).content, "messages.0.content")
    offset = len(req.messages) - len(msgs)
    turns: list[tuple[str, ImageRef | None]] = []
    answers: list[str] = []
    for k, msg in enumerate(msgs):
        i = k + offset
        want = "user" if k % 2 == 0 else "assistant"
        if msg.role != want:
            raise BadRequest(
                f"messages.{i}.role: expected {want!r} (after an optional system message, user and "
                f"assistant messages alternate, ending with user), got {msg.role!r}",
                f"messages.{i}.role",
                "invalid_value",
            )
        if want == "user":
            turns.append(_user(msg, i, allow_remote, max_image_bytes))
        else:
            answers.append(_text(msg.content, f"messages.{i}.content"))
    if len(turns) == len(answers):
        raise BadRequest("messages: the last message must be the user's", "messages", "invalid_value")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise BadRequest(f"stop: at most 4 sequences, got {len(stops)}", "stop", "invalid_value")
    fmt = constraint_format(req.response_format, req.json_schema, req.grammar)
    history = [PastTurn(q, img, a) for (q, img), a in zip(turns[:-1], answers, strict=True)]
    question, image = turns[-1]
    return ChatPlan(
        system=system,
        history=history,
        question=question,
        image=image,
        sampling=sampling_for(req, default),
        stop=[s for s in stops if s],
        response_format=fmt,
        grammar=req.grammar or None,
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def constraint_format(
    fmt: ResponseFormat | None, json_schema: dict[str, Any] | None, grammar: str | None
) -> ResponseFormat | None:
    """The one JSON constraint a request asks for (None: free text or a GBNF grammar); 400 for two."""
    asked = [
        n
        for n, v in (
            ("response_format", fmt and fmt.normalized()),
            ("json_schema", json_schema),
            ("grammar", grammar),
        )
        if v
    ]
    if len(asked) > 1:
        raise BadRequest(f"{' and '.join(asked)}: give at most one constraint", asked[1], "invalid_value")
    if json_schema:
        return ResponseFormat.of_schema(json_schema)
    fmt = fmt.normalized() if fmt is not None else None
    if (
        fmt is not None
        and fmt.type == "json_schema"
        and (fmt.json_schema is None or fmt.json_schema.schema_ is None)
    ):
        raise BadRequest(
            "response_format.json_schema.schema: required for type json_schema",
            "response_format.json_schema",
            "invalid_value",
        )
    return fmt


def sampling_for(req: ChatRequest, default: SamplingConfig) -> SamplingConfig:
    """temperature 0: greedy; > 0: sampled at that temperature; absent: the server's default."""
    limit = req.max_completion_tokens or req.max_tokens
    if limit is None and req.n_predict is not None and req.n_predict > 0:
        limit = req.n_predict
    return sampling(
        default,
        max_tokens=limit,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        repeat_penalty=req.repeat_penalty,
        seed=req.seed,
    )


def sampling(
    default: SamplingConfig,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repeat_penalty: float | None = None,
    seed: int | None = None,
) -> SamplingConfig:
    """The server's default with what a request gives (any API's spelling mapped here first).

    temperature 0: greedy; > 0: sampled at that temperature; absent: the server's default."""
    changes: dict[str, Any] = {}
    if max_tokens is not None:
        changes["max_new_tokens"] = max_tokens
    if temperature is not None:
        changes["do_sample"] = temperature > 0
        if temperature > 0:
            changes["temperature"] = temperature
    if top_p is not None:
        changes["top_p"] = top_p
    if top_k is not None:
        changes["top_k"] = top_k
    if min_p is not None:
        changes["min_p"] = min_p
    if repeat_penalty is not None:
        changes["repetition_penalty"] = repeat_penalty
    if seed is not None:
        changes["seed"] = seed
    try:
        return default.replace(**changes)
    except ConfigError as e:
        raise BadRequest(str(e), None, "invalid_value") from None
