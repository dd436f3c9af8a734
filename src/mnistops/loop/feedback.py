"""/feedback in the service: the answers it remembers, the checks on a label, and the
rate that bounds a flood.

An answer can be labelled for `serve.log.feedback_window_h` after it was given, by the
service that gave it (the service remembers at most `serve.log.known_requests` answers,
the oldest forgotten first; a restarted service knows none of the answers before it).
Labelling the same image again with another digit replaces the label: the later wins.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from mnistops.loop.records import REQUEST_ID, Label
from mnistops.settings import Settings


class FeedbackRefused(Exception):
    """A label the service does not take: `status` and `detail` for the answer."""

    def __init__(self, status: int, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s


Given = tuple[float, str, bytes]
"""an answer as /feedback knows it: when, the model version, the digits (a byte each);
about 260 bytes with its key: 100,000 of them (the default) hold about 26 MB"""


class FeedbackBook:
    """The answers that can be labelled, and how many labels the last minute took."""

    def __init__(self, settings: Settings) -> None:
        config = settings.serve.log
        self.window_s = config.feedback_window_h * 3600
        self.capacity = config.known_requests
        self.per_minute = config.feedback_per_minute
        self.lock = threading.Lock()
        self.given: OrderedDict[str, Given] = OrderedDict()
        self.labels: dict[str, dict[int, int]] = {}
        self.minute_start = 0.0
        self.minute_count = 0
        self.refused = 0
        self.accepted = 0
        self.started = time.time()

    def remember(self, request_id: str, model_version: str, digits: list[int]) -> None:
        now = time.time()
        with self.lock:
            self.given[request_id] = (now, model_version, bytes(digits))
            while len(self.given) > self.capacity:
                forgotten, _ = self.given.popitem(last=False)
                self.labels.pop(forgotten, None)

    def take(self, document: object) -> tuple[Label, int | None]:
        """The label of a /feedback body, and the digit it replaces (None: the first
        label of that image). FeedbackRefused says why a body is not taken."""
        request_id, item, digit = parse(document)
        now = time.time()
        with self.lock:
            self._count(now)
            given = self.given.get(request_id)
            if given is None or now - given[0] > self.window_s:
                raise FeedbackRefused(404, self._unknown(request_id, now))
            _when, version, digits = given
            if item is None and len(digits) > 1:
                raise FeedbackRefused(
                    422, f"item: that answer has {len(digits)} images; say which (0-based)"
                )
            item = item or 0
            if item >= len(digits):
                raise FeedbackRefused(
                    422, f"item {item}: that answer has {len(digits)} image(s), 0-based"
                )
            labels = self.labels.setdefault(request_id, {})
            replaced = labels.get(item)
            labels[item] = digit
            self.accepted += 1
        label = Label(now, request_id, item, digit, digits[item], version)
        return label, replaced

    def _unknown(self, request_id: str, now: float) -> str:
        window_h = self.window_s / 3600
        if now - self.started < self.window_s:
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
            known = f"this service (started {since}) knows only the answers it gave since"
        else:
            known = f"only answers of this service from the last {window_h:g} h"
            known += " (serve.log.feedback_window_h) can be labelled"
        return f"request_id {request_id} is unknown or expired: {known}"

    def _count(self, now: float) -> None:
        if now - self.minute_start >= 60:
            self.minute_start, self.minute_count = now, 0
        if self.minute_count >= self.per_minute:
            self.refused += 1
            wait = max(1, int(self.minute_start + 60 - now) + 1)
            raise FeedbackRefused(
                429,
                f"more than {self.per_minute} labels this minute"
                f" (serve.log.feedback_per_minute): try again in {wait} s",
                retry_after_s=wait,
            )
        self.minute_count += 1


def parse(document: object) -> tuple[str, int | None, int]:
    """(request_id, item, digit) of a /feedback body (item None: not given);
    FeedbackRefused(422) names the field that is wrong."""
    if not isinstance(document, dict):
        raise FeedbackRefused(422, 'expected a JSON object: {"request_id": "...", "digit": 7}')
    unknown = sorted(set(document) - {"request_id", "digit", "item"})
    if unknown:
        raise FeedbackRefused(
            422, f"unknown field(s) {', '.join(map(repr, unknown))}: send request_id, digit, item"
        )
    request_id = document.get("request_id")
    if isinstance(request_id, str):
        request_id = request_id.lower()
    if not isinstance(request_id, str) or not REQUEST_ID.match(request_id):
        raise FeedbackRefused(
            422, "request_id: expected the 32 hexadecimal digits of a /predict answer"
        )
    if "digit" not in document:
        raise FeedbackRefused(422, "digit: missing; send the right digit, a whole number 0-9")
    digit = document.get("digit")
    if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
        raise FeedbackRefused(422, f"digit: expected a whole number 0-9, got {digit!r:.40}")
    item = document.get("item")
    if item is None and "item" not in document:
        return request_id, None, digit
    if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= 4095:
        raise FeedbackRefused(
            422, f"item: expected the 0-based index of the image in a batch, got {item!r:.40}"
        )
    return request_id, item, digit
