"""Structured JSON logs. No line per request at INFO; rejections are sampled per reason."""

from __future__ import annotations

import logging
import sys
import threading
import time

from pythonjsonlogger.json import JsonFormatter


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter("{asctime}{levelname}{name}{message}", style="{",
                                       rename_fields={"asctime": "time", "levelname": "level"}))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class SampledLog:
    """At most one line per key per `interval` seconds, carrying how many were suppressed since.

    Under overload every rejected request is a candidate line; this keeps the log readable and cheap
    while the metrics still count every one.
    """

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, message: str, **fields: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e18) < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        self.logger.log(level, message, extra={**fields, "suppressed_since_last": suppressed})
