"""A local Amazon Transcribe streaming endpoint, backed by any `SpeechEngine`.

It speaks the service's wire protocol closely enough for the unchanged
amazon-transcribe client (and so `callstream.asr.transcribe.engine.TranscribeEngine`)
to run against it without AWS:

- `POST /stream-transcription` over HTTP/2 and TLS, parameters in
  `x-amzn-transcribe-*` headers, echoed back on a 200 response;
- request body: event-stream messages, each a signed envelope (`:date`,
  `:chunk-signature`) whose payload is an inner `AudioEvent` message; an
  envelope with an empty payload ends the audio (signatures are not checked);
- response body: one `TranscriptEvent` message (JSON) per hypothesis of the
  engine, or an exception message such as `LimitExceededException`;
- a stream refused at start gets an HTTP error status, `x-amzn-errortype` and a
  JSON `{"Message": ...}` body;
- a stream that receives no audio for `idle_timeout_s` (15 s, as the service
  does) fails with the service's `BadRequestException`;
- channel identification (`enable-channel-identification`, `number-of-channels`
  2): the interleaved frames are split, each channel is recognised by its own
  engine stream, and every result carries its `ChannelId` ("ch_0", "ch_1"),
  with an id unique across the channels.

Faults (`Fault`) are injected per stream, in the order streams open: fail with a
service exception at start or after N audio events, or drop the TCP connection.
Drops need a TCP relay in front of hypercorn, because ASGI gives an app no handle
on its connection; the relay is always there so every test takes the same path.

The server keeps a stream open after an exception until the client ends its
audio (bounded by `drain_timeout_s`): hypercorn cannot reset a single HTTP/2
stream, and data arriving for a stream it already closed tears down the whole
connection, with every other stream on it.
"""

from callstream_emulator.transcribe.errors import EXCEPTION_STATUS
from callstream_emulator.transcribe.faults import Fault, StreamRecord
from callstream_emulator.transcribe.params import STREAM_PATH
from callstream_emulator.transcribe.server import LocalTranscribeServer, ServerAddress

__all__ = [
    "EXCEPTION_STATUS",
    "STREAM_PATH",
    "Fault",
    "LocalTranscribeServer",
    "ServerAddress",
    "StreamRecord",
]
