"""Every Lambda zip `deploy/build_lambdas.py` builds runs where Lambda would run it.

Each zip is unpacked into an empty directory and imported by a fresh
interpreter whose only packages are boto3 and its requirements (what the
Lambda Python runtime provides), with PYTHONPATH the unpacked directory alone
and that directory as the working directory, as Lambda's /var/task. The
handler is then invoked on a real event against the emulator. The wheels are
built for this interpreter's Python, not the template's, so they can load here.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import uuid
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from callstream.contract import default_contract
from callstream.events import CallStarted, DeadLetter, Track, TranscriptSegmentProduced
from services.persister.adapters import ensure_tables
from services.sentiment.adapters import ensure_table as ensure_sentiment_table

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy"))
import build_lambdas  # noqa: E402

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
KVS_ARN = "arn:aws:kinesisvideo:us-east-1:123456789012:stream/connect-contact-abc/1700000000000"
# Runs inside the clean interpreter: import the handler, call it, report where modules came from.
_INVOKE = """
import importlib, json, sys
module, function = sys.argv[1].rsplit(".", 1)
handler = getattr(importlib.import_module(module), function)
answers = [handler(json.loads(event), None) for event in sys.argv[2:]]
origins = {n: getattr(m, "__file__", None) for n, m in sys.modules.items()}
print(json.dumps({"answers": answers, "origins": origins}))
"""


@pytest.fixture(scope="session")
def lambda_runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding only boto3 and its requirements, copied from this environment."""
    root = tmp_path_factory.mktemp("lambda-runtime")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    (site,) = root.glob("lib/python*/site-packages")
    for name in build_lambdas._closure(build_lambdas.RUNTIME_ROOT, PYTHON):
        dist = metadata.distribution(name)
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            if source.is_file() and not str(file).startswith(".."):
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, site / file)
    return root / "bin" / "python"


class Built:
    """Each function's zip, built on first use and unpacked into its own directory."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __getitem__(self, name: str) -> Path:
        root = self.out / name
        if not root.exists():
            archive = build_lambdas.build(build_lambdas.FUNCTIONS[name], self.out, PYTHON)
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(root)
        return root


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The built zips of this session."""
    return Built(tmp_path_factory.mktemp("lambda-zips"))


def invoke(
    python: Path, root: Path, handler: str, events: list[Any], env: dict[str, str]
) -> list[Any]:
    """Call `handler` on each event in a clean interpreter; return its answers."""
    result = subprocess.run(
        [str(python), "-c", _INVOKE, handler, *(json.dumps(e) for e in events)],
        env={**env, "PYTHONPATH": str(root), "LAMBDA_TASK_ROOT": str(root)},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    project = [n for n in report["origins"] if n.split(".")[0] in ("callstream", "services")]
    assert all(report["origins"][n].startswith(str(root)) for n in project), report["origins"]
    return list(report["answers"])


def read_stream(kinesis: Any, stream: str) -> list[bytes]:
    """Every record on a stream (one shard)."""
    shard = kinesis.list_shards(StreamName=stream)["Shards"][0]["ShardId"]
    iterator = kinesis.get_shard_iterator(
        StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    return [r["Data"] for r in kinesis.get_records(ShardIterator=iterator)["Records"]]


def test_the_trigger_zip_lacks_nothing_and_leaves_out_what_lambda_provides(
    built: Built,
) -> None:
    root = built["trigger"]
    assert (root / "callstream" / "metrics.py").is_file()
    assert (root / "schemas" / "CallStarted.v1.avsc").is_file()
    assert (root / "fastavro").is_dir()
    for absent in ("boto3", "botocore", "numpy", "moto", "onnxruntime", "callstream_emulator"):
        assert not (root / absent).exists(), absent


def test_the_trigger_zip_publishes_call_started_for_a_contact_flow_event(
    built: Built, lambda_runtime: Path, aws_env: dict[str, str], aws_session: Any
) -> None:
    kinesis = aws_session.client("kinesis")
    stream = f"calls-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=stream, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(StreamName=stream)
    contact = f"c-{uuid.uuid4().hex[:8]}"
    event = {
        "Name": "ContactFlowEvent",
        "Details": {
            "ContactData": {
                "ContactId": contact,
                "InstanceARN": "arn:aws:connect:us-east-1:123456789012:instance/inst-1",
                "Attributes": {"transcribeCall": "true"},
                "MediaStreams": {
                    "Customer": {"Audio": {"StreamARN": KVS_ARN, "StartFragmentNumber": "91"}}
                },
            }
        },
    }
    env = aws_env | {"CALLSTREAM_CALLS_STREAM": stream}
    handler = build_lambdas.FUNCTIONS["trigger"].handler
    answers = invoke(lambda_runtime, built["trigger"], handler, [event, {"bad": 1}], env)
    assert answers[0] == {"status": "accepted", "contactId": contact}
    assert answers[1]["status"] == "refused"
    (record,) = read_stream(kinesis, stream)
    started = default_contract().decode(record)
    assert isinstance(started, CallStarted)
    assert (started.contact_id, started.stream_arn) == (contact, KVS_ARN)
    assert started.start_fragment_number == "91"


def esm_event(kinesis: Any, stream: str) -> dict[str, Any]:
    """Every record of a one-shard stream as a Kinesis event source mapping delivers them."""
    arn = kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"][
        "StreamARN"
    ]
    shard = kinesis.list_shards(StreamName=stream)["Shards"][0]["ShardId"]
    iterator = kinesis.get_shard_iterator(
        StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    records = kinesis.get_records(ShardIterator=iterator)["Records"]
    return {
        "Records": [
            {
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": r["PartitionKey"],
                    "sequenceNumber": r["SequenceNumber"],
                    "data": base64.b64encode(r["Data"]).decode(),
                    "approximateArrivalTimestamp": r["ApproximateArrivalTimestamp"].timestamp(),
                },
                "eventSource": "aws:kinesis",
                "eventID": f"{shard}:{r['SequenceNumber']}",
                "eventSourceARN": arn,
                "awsRegion": "us-east-1",
            }
            for r in records
        ]
    }


@pytest.mark.parametrize("name", ["persister", "sentiment"])
def test_the_consumer_zips_write_rows_for_a_kinesis_batch(
    name: str,
    built: Built,
    lambda_runtime: Path,
    aws_env: dict[str, str],
    aws_session: Any,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    env = aws_env | {
        "CALLSTREAM_TRANSCRIPTS_STREAM": f"tx-{suffix}",
        "CALLSTREAM_DEADLETTER_STREAM": f"dl-{suffix}",
        "TABLE_CALLER_TRANSCRIPT": f"cust-{suffix}",
        "TABLE_CALLER_TRANSCRIPT_TO_CUSTOMER": f"agent-{suffix}",
        "CALLSTREAM_SENTIMENT_TABLE": f"sentiment-{suffix}",
        "CALLSTREAM_SENTIMENT_ENGINE": "offline",
    }
    kinesis = aws_session.client("kinesis")
    for stream in (f"tx-{suffix}", f"dl-{suffix}"):
        kinesis.create_stream(StreamName=stream, ShardCount=1)
        kinesis.get_waiter("stream_exists").wait(StreamName=stream)
    dynamodb = aws_session.client("dynamodb")
    ensure_tables(dynamodb, [f"cust-{suffix}", f"agent-{suffix}"])
    ensure_sentiment_table(dynamodb, f"sentiment-{suffix}")
    contact = f"c-{suffix}"
    final = TranscriptSegmentProduced(
        contact, Track.FROM_CUSTOMER, f"{contact}:1000", 1000, 2000, "thank you, great help", False
    )
    data = default_contract().encode(final)
    kinesis.put_record(StreamName=f"tx-{suffix}", PartitionKey=contact, Data=data)
    kinesis.put_record(StreamName=f"tx-{suffix}", PartitionKey=contact, Data=b"not avro")
    event = esm_event(kinesis, f"tx-{suffix}")
    handler = build_lambdas.FUNCTIONS[name].handler
    (answer,) = invoke(lambda_runtime, built[name], handler, [event], env)
    assert answer == {"batchItemFailures": []}
    table = f"cust-{suffix}" if name == "persister" else f"sentiment-{suffix}"
    (row,) = dynamodb.scan(TableName=table)["Items"]
    assert row["ContactId"] == {"S": contact}
    if name == "sentiment":
        assert row["Sentiment"] == {"S": "POSITIVE"}
    (letter,) = [default_contract().decode(d) for d in read_stream(kinesis, f"dl-{suffix}")]
    assert isinstance(letter, DeadLetter) and letter.data == b"not avro"


def test_every_function_of_the_template_imports_from_its_built_zip(
    built: Built, lambda_runtime: Path, aws_env: dict[str, str]
) -> None:
    from cfnlint.decode import decode

    template, problems = decode(str(REPO / "deploy" / "callstream.yaml"))
    assert not problems and template is not None
    by_handler = {f.handler: name for name, f in build_lambdas.FUNCTIONS.items()}
    handlers = [
        r["Properties"]["Handler"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::Lambda::Function"
    ]
    assert sorted(handlers) == sorted(by_handler)
    for handler in handlers:
        assert invoke(lambda_runtime, built[by_handler[handler]], handler, [], aws_env) == []
