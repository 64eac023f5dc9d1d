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
    shutdown_timeout: float = 30.0            # after SIGTERM: how long in-flight requests may finish
    # Generation requests (chat, completions) admitted at once; one more is answered 429 by the guard before its
    # body is read (the CLI sets the engine's running + waiting bound). None: only the engine's queue bounds them.
    max_admitted_requests: int | None = None
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
        if self.shutdown_timeout < 0:
            raise ValueError(f"ServerSettings.shutdown_timeout: must be >= 0 (got {self.shutdown_timeout})")
        if self.max_admitted_requests is not None and self.max_admitted_requests < 1:
            raise ValueError(f"ServerSettings.max_admitted_requests: must be >= 1 (got {self.max_admitted_requests})")

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
    num_admitted: int = 0             # generation requests past admission control, not yet answered

    def request_started(self) -> None:
        self.num_inflight += 1

    def request_finished(self) -> None:
        self.num_inflight = max(0, self.num_inflight - 1)

    def admit(self) -> bool:
        """Take a generation slot if one is free. Runs on the event loop only, so the check and the increment
        cannot interleave with another request's."""
        limit = self.settings.max_admitted_requests
        if limit is not None and self.num_admitted >= limit:
            return False
        self.num_admitted += 1
        return True

    def release(self) -> None:
        self.num_admitted = max(0, self.num_admitted - 1)
