"""The event-stream codec: request envelopes to audio payloads, results to response messages."""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Mapping
from typing import Any

from amazon_transcribe.eventstream import EventStreamBuffer, EventStreamMessageSerializer

from callstream.asr.port import Hypothesis, Word

_log = logging.getLogger(__name__)


class AudioDecoder:
    """Turns request body bytes into audio payloads; `None` marks the end of audio."""

    def __init__(self) -> None:
        self._envelopes = EventStreamBuffer()

    def feed(self, data: bytes) -> list[bytes | None]:
        self._envelopes.add_data(data)
        out: list[bytes | None] = []
        for envelope in self._envelopes:
            if not envelope.payload:
                out.append(None)
                continue
            inner = EventStreamBuffer()
            inner.add_data(envelope.payload)
            for message in inner:
                if message.headers.get(":event-type") == "AudioEvent":
                    out.append(bytes(message.payload))
                else:
                    _log.debug("ignoring event %s", message.headers.get(":event-type"))
        return out


def _encode(headers: dict[str, Any], body: Mapping[str, Any]) -> bytes:
    payload = json.dumps(body).encode("utf-8")
    return EventStreamMessageSerializer().serialize(headers, payload)


def transcript_event(hypothesis: Hypothesis, channel_id: str | None) -> bytes:
    headers = {
        ":message-type": "event",
        ":event-type": "TranscriptEvent",
        ":content-type": "application/json",
    }
    result = _result_json(hypothesis)
    if channel_id is not None:
        result["ChannelId"] = channel_id
    return _encode(headers, {"Transcript": {"Results": [result]}})


def exception_event(name: str, message: str) -> bytes:
    headers = {
        ":message-type": "exception",
        ":exception-type": name,
        ":content-type": "application/json",
    }
    return _encode(headers, {"Message": message})


def _result_json(hypothesis: Hypothesis) -> dict[str, Any]:
    alternative = {
        "Transcript": hypothesis.text,
        "Items": [_item_json(word) for word in hypothesis.words],
    }
    return {
        "ResultId": hypothesis.result_id,
        "StartTime": hypothesis.start_ms / 1000,
        "EndTime": hypothesis.end_ms / 1000,
        "IsPartial": hypothesis.is_partial,
        "Alternatives": [alternative],
    }


def _item_json(word: Word) -> dict[str, Any]:
    punctuation = bool(word.text) and all(c in string.punctuation for c in word.text)
    item: dict[str, Any] = {
        "StartTime": word.start_ms / 1000,
        "EndTime": word.end_ms / 1000,
        "Type": "punctuation" if punctuation else "pronunciation",
        "Content": word.text,
        "VocabularyFilterMatch": False,
    }
    if word.confidence is not None:
        item["Confidence"] = word.confidence
    return item
