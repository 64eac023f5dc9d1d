"""Server settings (what `nemoh serve` flags turn into) and the per-app shared state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_HEADER_BYTES = 16 * 1024


@dataclass
class ServerSettings:
    served_model_names: list[str]
    model_path: str = ""
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)   # CORS; empty: no cross-origin access
    reasoning_parser: str | None = "super_v3"
    tool_call_parser: str | None = "qwen3_coder"
    enable_auto_tool_choice: bool = False
    constrain_auto_tool_choice: bool = True   # "auto": a call must name an offered tool (constrained decoding)
    trust_request_chat_template: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    drain_timeout: float = 30.0
    health_check_interval: float = 1.0
    disconnect_poll_interval: float = 0.1
    system_fingerprint: str | None = None
    api_docs: bool = True                     # FastAPI's /docs, /redoc and /openapi.json, as vLLM serves them
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:N" (vLLM's flag), not text

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("ServerSettings.served_model_names: at least one non-empty name is required")
        if self.api_key is not None and not self.api_key:
            raise ValueError("ServerSettings.api_key: must not be empty (leave it unset to disable auth)")
        if self.max_body_bytes < 1024:
            raise ValueError(f"ServerSettings.max_body_bytes: must be >= 1024 (got {self.max_body_bytes})")
        if self.drain_timeout < 0:
            raise ValueError(f"ServerSettings.drain_timeout: must be >= 0 (got {self.drain_timeout})")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


@dataclass
class ServerState:
    """What every handler needs: the engine, the template, the settings, and the drain/health flags."""

    engine: Any                       # nemoh.engine.async_engine.AsyncLLMEngine or a test double
    settings: ServerSettings
    chat_template: Any                # nemoh.chat.ChatTemplate
    metrics: Any                      # nemoh.server.metrics.ServerMetrics
    draining: bool = False
    dead: bool = False
    num_inflight: int = 0

    def request_started(self) -> None:
        self.num_inflight += 1

    def request_finished(self) -> None:
        self.num_inflight = max(0, self.num_inflight - 1)
