"""One request's measurements, as every API's load generator records them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """One request's timeline, seconds relative to its send time."""

    prompt_tokens: int
    output_tokens: int = 0
    # Served from the server's prefix cache; None where the API does not report it.
    cached_prompt_tokens: int | None = 0
    ttft: float | None = None
    latency: float | None = None
    itls: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.latency is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)
