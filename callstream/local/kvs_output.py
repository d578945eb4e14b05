"""The bytes KVS GetMedia sends for one stored fragment.

Each fragment is a self-contained Matroska document, as real KVS writes it:
EBML header, an unknown-size Segment holding the producer's Info and Tracks,
the fragment's leading tags, the server's fragment-number/timestamp tags, the
Cluster exactly as received, the trailing tags, then the millis-behind-now and
continuation-token tags.
"""

from __future__ import annotations

from callstream.local.kvs_store import StoredFragment
from callstream.mkv.ebml import SEGMENT, UNKNOWN_SIZE, ebml_header, encode_id, encode_size
from callstream.mkv.ebml import tags_element as _tags

FRAGMENT_NUMBER_TAG = "AWS_KINESISVIDEO_FRAGMENT_NUMBER"
SERVER_TIMESTAMP_TAG = "AWS_KINESISVIDEO_SERVER_TIMESTAMP"
PRODUCER_TIMESTAMP_TAG = "AWS_KINESISVIDEO_PRODUCER_TIMESTAMP"
MILLIS_BEHIND_NOW_TAG = "AWS_KINESISVIDEO_MILLIS_BEHIND_NOW"
CONTINUATION_TOKEN_TAG = "AWS_KINESISVIDEO_CONTINUATION_TOKEN"


def format_timestamp(epoch_ms: int) -> str:
    """Epoch milliseconds as KVS prints them in tags: '1782912654.706'."""
    return f"{epoch_ms // 1000}.{epoch_ms % 1000:03d}"


def render_fragment(fragment: StoredFragment, now_ms: int) -> bytes:
    """One GetMedia fragment; `now_ms` (epoch ms) sets MILLIS_BEHIND_NOW."""
    media = fragment.media
    number = fragment.number_str
    identity = _tags(
        [
            (FRAGMENT_NUMBER_TAG, number),
            (SERVER_TIMESTAMP_TAG, format_timestamp(fragment.server_ms)),
            (PRODUCER_TIMESTAMP_TAG, format_timestamp(fragment.producer_ms)),
        ]
    )
    behind = max(0, now_ms - fragment.server_ms)
    position = _tags([(MILLIS_BEHIND_NOW_TAG, str(behind)), (CONTINUATION_TOKEN_TAG, number)])
    return b"".join(
        [
            ebml_header(),
            encode_id(SEGMENT) + encode_size(UNKNOWN_SIZE),
            media.info,
            media.tracks,
            *media.leading_tags,
            identity,
            media.cluster,
            *media.trailing_tags,
            position,
        ]
    )
