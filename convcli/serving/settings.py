"""What `convcli serve` can be told: where to listen, who may call, how requests batch.

Light (no FastAPI, no torch): the CLI builds its options from this dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from convcli.errors import UsageError


@dataclass
class ServeSettings:
    """The server's network, safety and batching settings."""

    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)."""
    port: int = 8000
    """Port to listen on."""
    api_key: str | None = None
    """Require the header "Authorization: Bearer KEY" on /v1/ (the page has a field for it)."""
    cors_origin: list[str] = field(default_factory=list)
    """Let browser pages from this origin call the API (repeatable; * for any)."""
    model_name: str | None = None
    """The model id clients send and /v1/models lists (default: the folder's name)."""
    workers: int = 1
    """Server processes, each with its own copy of the model (and `threads` threads each).
    On one CPU, 1 with batching is usually fastest; more suit several devices or sockets."""
    batch_window_ms: float = 10.0
    """How long the first request of a batch waits for others to join it."""
    max_batch_rows: int = 64
    """Rows (replies and MMI candidates) decoded together at most."""
    request_timeout: float = 300.0
    """Seconds a request may take, waiting included, before it is answered 504 and
    its decoding stops."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted (413 above)."""
    max_n: int = 8
    """Largest n (replies per request) a request may ask for."""
    max_candidates: int = 32
    """Largest MMI num_candidates a request may ask for."""

    def __post_init__(self) -> None:
        least = {"port": 0, "workers": 1, "max_batch_rows": 1, "max_body_bytes": 1024,
                 "max_n": 1, "max_candidates": 1}  # fmt: skip
        for name, low in least.items():
            if getattr(self, name) < low:
                raise UsageError(
                    f"`{name}` must be at least {low}, got {getattr(self, name)}", param=name
                )
        if self.port > 65535:
            raise UsageError(f"`port` must be at most 65535, got {self.port}", param="port")
        for name in ("batch_window_ms", "request_timeout"):
            if getattr(self, name) < 0:
                raise UsageError(f"`{name}` must be >= 0", param=name)
