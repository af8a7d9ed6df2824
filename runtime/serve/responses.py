"""The JSON bodies the server answers with, as pydantic models: what /openapi.json describes (openapi.py's
table points at them) and what the schema-conformance fuzzing (tests/serve/test_serve_openapi.py) checks
every response against. Unknown fields are forbidden, so a handler that grows a field this file lacks
fails that check instead of drifting from the document.

    OpenAI (app.py)        Error, ModelList, ModelCard, ChatCompletion, Embeddings, Health
    ollama (ollama.py)     OllamaError, OllamaChatAnswer, OllamaGenerateAnswer, Tags, RunningModels,
                           ShowAnswer, VersionAnswer
    llama-server (llama.py) Completion, TextCompletion, Tokens, Detokenized, Props

Streams (SSE, NDJSON) are not JSON documents: openapi.py gives their media types, docs/serve.md their events.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- OpenAI (and llama-server's errors) -----------------------------------------------------------


class ErrorDetail(_Body):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(_Body):
    """OpenAI's error shape (errors.APIError.body), also llama-server's."""

    error: ErrorDetail


class ModelCard(_Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Body):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Body):
    """200 with status "ok"; 503 with "loading" or "closed" (and "failed" with the load error)."""

    status: Literal["ok", "loading", "closed", "failed"]
    model: str
    queue: int
    running: int
    completed: int
    cancelled: int
    timed_out: int
    refused: int
    rejected: int
    failed: int
    error: str | None = None


class PromptTokensDetails(_Body):
    cached_tokens: int


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(_Body):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChatChoice(_Body):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


Timings = dict[str, float]  # the runtime's Timings.to_dict(): prefill_ms, decode_tok_s, images_cached, ...


class ChatCompletion(_Body):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    timings: Timings


class Embedding(_Body):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32
    shape: list[int]


class EmbeddingUsage(_Body):
    prompt_tokens: int
    total_tokens: int


class Embeddings(_Body):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# -- ollama ---------------------------------------------------------------------------------------


class OllamaError(_Body):
    error: str


class OllamaAnswerMessage(_Body):
    role: Literal["assistant"]
    content: str


class _OllamaAnswer(_Body):
    """One NDJSON line, or the whole answer with `"stream": false`. The durations (nanoseconds) and
    counts come with `"done": true`; `done_reason` "load" answers a request without messages."""

    model: str
    created_at: str
    done: bool
    done_reason: Literal["stop", "length", "load"] | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaChatAnswer(_OllamaAnswer):
    message: OllamaAnswerMessage


class OllamaGenerateAnswer(_OllamaAnswer):
    response: str


class OllamaDetails(_Body):
    parent_model: str
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class OllamaModel(_Body):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaDetails


class Tags(_Body):
    models: list[OllamaModel]


class RunningModel(OllamaModel):
    expires_at: str
    size_vram: int
    context_length: int | None


class RunningModels(_Body):
    models: list[RunningModel]


class ShowAnswer(_Body):
    modelfile: str
    parameters: str
    template: str
    system: str
    details: OllamaDetails
    model_info: dict[str, Any]
    capabilities: list[Literal["completion", "vision"]]
    modified_at: str


class VersionAnswer(_Body):
    version: str


# -- llama-server ---------------------------------------------------------------------------------


class SamplingSettings(_Body):
    n_predict: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    seed: int


class GenerationSettings(SamplingSettings):
    n_ctx: int | None


class CompletionTimings(_Body):
    cache_n: int
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float
    first_token_ms: float


class Completion(_Body):
    """/completion's answer (and its stream's last event)."""

    model: str
    id_slot: int
    index: int
    content: str
    stop: Literal[True]
    stop_type: Literal["eos", "limit", "word"]
    stopping_word: str
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int
    truncated: bool
    prompt: str
    generation_settings: GenerationSettings
    timings: CompletionTimings


class TextChoice(_Body):
    text: str
    index: int
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class TextCompletion(_Body):
    """OpenAI's legacy /v1/completions answer."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
    timings: Timings


class TokenPiece(_Body):
    id: int
    piece: str


class Tokens(_Body):
    """/tokenize: ids, or `{"id", "piece"}` pairs with `with_pieces`."""

    tokens: list[int] | list[TokenPiece]


class Detokenized(_Body):
    content: str


class DefaultSettings(_Body):
    n_ctx: int
    params: SamplingSettings


class Modalities(_Body):
    vision: bool
    audio: bool


class Props(_Body):
    default_generation_settings: DefaultSettings
    total_slots: int
    model_alias: str
    model_path: str
    modalities: Modalities
    chat_template: str
    bos_token: str
    eos_token: str
    build_info: str
