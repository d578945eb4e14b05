"""The bytes KVS GetMedia sends for one stored fragment.

Each fragment is a self-contained Matroska document, as real KVS writes it:
EBML header, an unknown-size Segment holding the producer's Info and Tracks,
the fragment's leading tags, the server's fragment-number/timestamp tags, the
Cluster exactly as received, the trailing tags, then the millis-behind-now and
continuation-token tags. A live fragment is sent in that order as it arrives:
`render_head` when its Cluster starts, the Cluster bytes and trailing tags as
they come, `render_tail` once it is complete.
"""

from __future__ import annotations

from callstream.mkv.ebml import SEGMENT, UNKNOWN_SIZE, ebml_header, encode_id, encode_size
from callstream.mkv.ebml import tags_element as _tags
from callstream_emulator.kvs_store import FragmentHead, StoredFragment

FRAGMENT_NUMBER_TAG = "AWS_KINESISVIDEO_FRAGMENT_NUMBER"
SERVER_TIMESTAMP_TAG = "AWS_KINESISVIDEO_SERVER_TIMESTAMP"
PRODUCER_TIMESTAMP_TAG = "AWS_KINESISVIDEO_PRODUCER_TIMESTAMP"
MILLIS_BEHIND_NOW_TAG = "AWS_KINESISVIDEO_MILLIS_BEHIND_NOW"
CONTINUATION_TOKEN_TAG = "AWS_KINESISVIDEO_CONTINUATION_TOKEN"


def format_timestamp(epoch_ms: int) -> str:
    """Epoch milliseconds as KVS prints them in tags: '1782912654.706'."""
    return f"{epoch_ms // 1000}.{epoch_ms % 1000:03d}"


def render_head(head: FragmentHead) -> bytes:
    """Everything GetMedia sends of a fragment before its Cluster."""
    identity = _tags(
        [
            (FRAGMENT_NUMBER_TAG, str(head.number)),
            (SERVER_TIMESTAMP_TAG, format_timestamp(head.server_ms)),
            (PRODUCER_TIMESTAMP_TAG, format_timestamp(head.producer_ms)),
        ]
    )
    return b"".join(
        [
            ebml_header(),
            encode_id(SEGMENT) + encode_size(UNKNOWN_SIZE),
            head.info,
            head.tracks,
            *head.leading_tags,
            identity,
        ]
    )


def render_tail(head: FragmentHead, now_ms: int) -> bytes:
    """The position tags that close a fragment; `now_ms` (epoch ms) sets MILLIS_BEHIND_NOW."""
    behind = max(0, now_ms - head.server_ms)
    number = str(head.number)
    return _tags([(MILLIS_BEHIND_NOW_TAG, str(behind)), (CONTINUATION_TOKEN_TAG, number)])


def render_fragment(fragment: StoredFragment, now_ms: int) -> bytes:
    """One whole GetMedia fragment; `now_ms` (epoch ms) sets MILLIS_BEHIND_NOW."""
    head = FragmentHead.of(fragment)
    media = fragment.media
    return b"".join(
        [render_head(head), media.cluster, *media.trailing_tags, render_tail(head, now_ms)]
    )
