"""Runs a synchronous engine's decoding on a shared thread pool.

The offline engine decodes inside `RecognitionStream.poll()`. Wrapped by
`PooledEngine`, a stream's `send()` and `poll()` only hand work to a pool
thread and collect what earlier work produced, so the caller (the transcriber's
consumer loop) is never held up by decoding, and several calls decode at once
(onnxruntime releases the GIL while it runs a graph). Each stream has at most
one job in flight, so its audio is decoded in order; pool threads are shared
fairly between streams because jobs queue first come, first served.

`close()` still blocks: it waits for the stream's job, then decodes the last
utterance on the caller's thread.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

from callstream.asr.port import Hypothesis, RecognitionStream, SpeechEngine, SpeechEngineError

log = logging.getLogger(__name__)


class PooledStream:
    """A stream whose `poll()` work runs on the pool; used from one thread."""

    def __init__(self, inner: RecognitionStream, pool: ThreadPoolExecutor) -> None:
        self._inner = inner
        self._pool = pool
        self._job: Future[list[Hypothesis]] | None = None
        self._ready: list[Hypothesis] = []
        self._failure: SpeechEngineError | None = None

    def send(self, pcm: bytes) -> None:
        """Queue audio and have a pool thread take it in."""
        self._inner.send(pcm)
        self._kick()

    def poll(self) -> list[Hypothesis]:
        """What finished jobs produced; starts the next job. Raises a failure once
        the results before it are handed out."""
        self._kick()
        ready, self._ready = self._ready, []
        if not ready and self._failure is not None:
            raise self._failure
        return ready

    def close(self) -> list[Hypothesis]:
        """Wait for the job in flight, then flush the inner stream."""
        if self._job is not None:
            self._collect(self._job)
        ready, self._ready = self._ready, []
        if self._failure is not None:
            error = self._failure
            raise type(error)(str(error), code=error.code, hypotheses=tuple(ready)) from error
        try:
            return ready + self._inner.close()
        except SpeechEngineError as error:
            merged = (*ready, *error.hypotheses)
            raise type(error)(str(error), code=error.code, hypotheses=merged) from error

    def _kick(self) -> None:
        if self._job is not None:
            if not self._job.done():
                return
            self._collect(self._job)
        if self._failure is None:
            self._job = self._pool.submit(self._inner.poll)

    def _collect(self, job: Future[list[Hypothesis]]) -> None:
        self._job = None
        try:
            self._ready.extend(job.result())
        except SpeechEngineError as error:
            self._ready.extend(error.hypotheses)
            self._failure = error


class PooledEngine:
    """A `SpeechEngine` whose streams decode on `workers` shared threads."""

    def __init__(self, engine: SpeechEngine, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.name = engine.name
        self.workers = workers
        self._engine = engine
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="asr-decode")

    def open_stream(self, *, contact_id: str, track: str, language: str) -> PooledStream:
        """Open the inner engine's stream (errors raise here, as they would unwrapped)."""
        inner = self._engine.open_stream(contact_id=contact_id, track=track, language=language)
        return PooledStream(inner, self._pool)

    def close(self) -> None:
        """Finish the jobs in flight and stop the threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)
