"""The few exceptions fogsplit raises; each carries the data an operator needs."""
from __future__ import annotations


class FogsplitError(Exception):
    """Base of every error fogsplit raises on purpose."""


class DataError(FogsplitError):
    """A data file or array does not match the documented format."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


class BundleError(FogsplitError):
    """A bundle is missing, malformed, or does not match its hashes."""


class ConfigError(FogsplitError):
    """A configuration value is unknown, of the wrong type, or out of bounds."""


class FrameError(FogsplitError):
    """A frame was refused. Carries what the error topic and the log report."""

    def __init__(self, rule: str, detail: str, *, device: str | None = None,
                 event: int | None = None, topic: str | None = None) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail
        self.device = device
        self.event = event
        self.topic = topic

    def as_report(self) -> dict:
        """JSON-ready description for the error topic."""
        return {"rule": self.rule, "detail": self.detail, "device": self.device,
                "event": self.event, "topic": self.topic}
