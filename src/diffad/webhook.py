"""A webhook that never holds up the line: rows POSTed as JSON from a background thread, with retries and a bounded
queue (``diffad watch --webhook``).

:meth:`Webhook.send` returns at once. A background thread POSTs each row (``Content-Type: application/json``) and
retries a failed POST (a refused connection, a timeout, an HTTP status >= 300) with exponential backoff; after
``attempts`` tries it gives the row up with a warning. When the queue is full, the OLDEST waiting row is dropped
(with a warning) to make room: a dead webhook costs memory for ``queue_size`` rows at most and never blocks
scoring. The caller keeps every row in its CSV, so a dropped POST loses nothing.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from typing import Any, Optional
from urllib.parse import urlparse

__all__ = ["Webhook", "check_url"]

logger = logging.getLogger(__name__)


def check_url(url: str) -> str:
    """``url`` when it is an http(s) URL with a host; else ``ValueError`` naming ``--webhook``."""
    parts = urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--webhook {url!r} is not an http(s) URL: pass e.g. http://mes.local:8080/diffad")
    return url


class Webhook:
    """POST JSON rows to ``url`` from a background thread.

    Args:
        url: the endpoint (http or https).
        queue_size: rows waiting at most; the oldest is dropped beyond.
        attempts: tries per row (>= 1).
        backoff: seconds before the first retry, doubled after each failure (capped at 30 s).
        timeout: seconds per POST.
    """

    def __init__(self, url: str, *, queue_size: int = 1000, attempts: int = 5, backoff: float = 0.5,
                 timeout: float = 5.0):
        self.url = check_url(url)
        self.attempts, self.backoff, self.timeout = max(1, attempts), backoff, timeout
        self.delivered = self.failed = self.dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diffad-webhook", daemon=True)
        self._thread.start()

    def send(self, row: dict[str, Any]) -> None:
        """Queue ``row`` for POSTing; never blocks (the oldest waiting row makes room when the queue is full)."""
        while True:
            try:
                self._queue.put_nowait(row)
                return
            except queue.Full:
                try:
                    old = self._queue.get_nowait()
                except queue.Empty:
                    continue
                self.dropped += 1
                logger.warning("webhook %s: queue full, dropped the POST of %s (it is in results.csv)", self.url,
                               old.get("file"))

    def _post(self, row: dict[str, Any]) -> None:
        request = urllib.request.Request(self.url, data=json.dumps(row).encode("utf-8"), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            if response.status >= 300:
                raise urllib.error.HTTPError(self.url, response.status, "not a success", response.headers, None)

    def _deliver(self, row: dict[str, Any]) -> None:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                self._post(row)
                self.delivered += 1
                return
            except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, refused connections
                if attempt == self.attempts or self._stop.is_set():
                    self.failed += 1
                    logger.warning("webhook %s: gave up on %s after %d tries (%s); it is in results.csv", self.url,
                                   row.get("file"), attempt, " ".join(str(exc).split()))
                    return
                self._stop.wait(delay)
                delay = min(2 * delay, 30.0)

    def _run(self) -> None:
        while True:
            try:
                row = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            self._deliver(row)

    def close(self, timeout: Optional[float] = 10.0) -> None:
        """Send what is queued for up to ``timeout`` seconds (no more retries once closing), then stop."""
        self._stop.set()
        self._thread.join(timeout)
        left = self._queue.qsize()
        if left or self._thread.is_alive():
            logger.warning("webhook %s: %d rows not posted at exit (they are in results.csv)", self.url, left)
