"""deploy/callstream.yaml: cfn-lint clean, and the properties the issue asks for hold.

The template is parsed with cfn-lint's own decoder (it understands !Ref, !Sub, ...),
then each resource is checked: the reference's table keys with TTL, PITR and
encryption; a private, encrypted bucket; one Fargate service per service with its
own least-privilege task role; the trigger Lambda's handler; kms:Decrypt for KVS
streams under a customer key.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.ingest.settings import IngestSettings
from services.persister.settings import PersisterSettings
from services.recorder.settings import RecorderSettings
from services.sentiment.settings import SentimentSettings
from services.transcriber.settings import TranscriberSettings

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "callstream.yaml"
# Actions AWS offers no resource-level permissions for.
NO_RESOURCE_LEVEL_ACTIONS = ("transcribe:StartStreamTranscription", "comprehend:DetectSentiment")
SERVICES = ("Ingest", "Transcriber", "Recorder", "Persister", "Sentiment")
LAMBDA_CONSUMERS = ("Persister", "Sentiment")


def _cfn_lint() -> str:
    found = shutil.which("cfn-lint", path=str(Path(sys.executable).parent)) or shutil.which(
        "cfn-lint"
    )
    if found is None:
        pytest.fail("cfn-lint is not installed: add cfn-lint to the dev dependencies")
    return found


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    from cfnlint.decode import decode

    parsed, problems = decode(str(TEMPLATE))
    assert not problems, problems
    assert parsed is not None
    return dict(parsed)


def _resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind}


def _statements(template: dict[str, Any], role: str) -> list[dict[str, Any]]:
    """Every Allow statement a task role gets: inline policies plus managed ones."""
    props = template["Resources"][role]["Properties"]
    docs = [p["PolicyDocument"] for p in props.get("Policies", [])]
    for ref in props.get("ManagedPolicyArns", []):
        if isinstance(ref, dict) and "Ref" in ref:
            docs.append(template["Resources"][ref["Ref"]]["Properties"]["PolicyDocument"])
    out: list[dict[str, Any]] = []
    for doc in docs:
        for statement in doc["Statement"]:
            if "Fn::If" in statement:
                statement = statement["Fn::If"][1]
            out.append(statement)
    return out


def _actions(template: dict[str, Any], role: str) -> set[str]:
    actions: set[str] = set()
    for statement in _statements(template, role):
        value = statement["Action"]
        actions.update([value] if isinstance(value, str) else value)
    return actions


def test_cfn_lint_reports_nothing() -> None:
    result = subprocess.run(
        [_cfn_lint(), str(TEMPLATE)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_transcript_tables_have_the_reference_keys_ttl_pitr_and_encryption(
    template: dict[str, Any],
) -> None:
    for name in ("CustomerTranscriptTable", "AgentTranscriptTable"):
        props = template["Resources"][name]["Properties"]
        assert props["KeySchema"] == [
            {"AttributeName": "ContactId", "KeyType": "HASH"},
            {"AttributeName": "StartTime", "KeyType": "RANGE"},
        ]
        types = {a["AttributeName"]: a["AttributeType"] for a in props["AttributeDefinitions"]}
        assert types == {"ContactId": "S", "StartTime": "N"}
        assert props["TimeToLiveSpecification"] == {
            "AttributeName": "ExpiresAfter",
            "Enabled": True,
        }
        assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
        assert props["SSESpecification"]["SSEEnabled"] is True


@pytest.mark.parametrize("resource", ["LeaseTable", "ProgressTable"])
def test_lease_and_progress_tables_have_the_keys_the_code_creates(
    template: dict[str, Any], aws_session: Any, resource: str
) -> None:
    from callstream.bus.leases import LeaseTable
    from callstream.progress import DynamoProgress

    dynamodb = aws_session.client("dynamodb")
    name = f"keys-{resource}"
    if resource == "LeaseTable":
        LeaseTable(dynamodb, name).ensure_table()
    else:
        DynamoProgress(dynamodb, name, "any")
    made = dynamodb.describe_table(TableName=name)["Table"]
    props = template["Resources"][resource]["Properties"]
    assert props["KeySchema"] == made["KeySchema"]
    assert props["AttributeDefinitions"] == made["AttributeDefinitions"]
    if resource == "ProgressTable":
        ttl = dynamodb.describe_time_to_live(TableName=name)["TimeToLiveDescription"]
        assert props["TimeToLiveSpecification"]["AttributeName"] == ttl["AttributeName"]


def test_recordings_bucket_is_private_and_encrypted(template: dict[str, Any]) -> None:
    props = template["Resources"]["RecordingsBucket"]["Properties"]
    block = props["PublicAccessBlockConfiguration"]
    assert all(block[k] is True for k in block) and len(block) == 4
    rule = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"


def test_streams_are_on_demand_or_provisioned_by_parameter(template: dict[str, Any]) -> None:
    streams = _resources(template, "AWS::Kinesis::Stream")
    assert set(streams) == {
        "CallsStream",
        "AudioStream",
        "TranscriptsStream",
        "DeadLetterStream",
        "RecordingsStream",
    }
    for stream in streams.values():
        props = stream["Properties"]
        assert props["StreamModeDetails"]["StreamMode"] == {"Ref": "StreamMode"}
        assert props["ShardCount"]["Fn::If"][0] == "IsProvisioned"
        assert props["StreamEncryption"]["EncryptionType"] == "KMS"


def test_each_service_runs_on_fargate_with_its_own_command_and_role(
    template: dict[str, Any],
) -> None:
    for name in SERVICES:
        service = template["Resources"][f"{name}Service"]["Properties"]
        assert service["LaunchType"] == "FARGATE"
        task = template["Resources"][service["TaskDefinition"]["Ref"]]["Properties"]
        assert task["RequiresCompatibilities"] == ["FARGATE"]
        assert task["TaskRoleArn"] == {"Fn::GetAtt": [f"{name}TaskRole", "Arn"]}
        (container,) = task["ContainerDefinitions"]
        assert container["Image"] == {"Ref": "ImageUri"}
        assert container["Command"] == ["python", "-m", f"services.{name.lower()}.main"]


def test_each_service_scales_on_its_input_streams_iterator_age(template: dict[str, Any]) -> None:
    inputs = {"Transcriber": "AudioStream", "Recorder": "AudioStream"}
    inputs |= {"Persister": "TranscriptsStream", "Ingest": "CallsStream"}
    inputs |= {"Sentiment": "TranscriptsStream"}
    for name, stream in inputs.items():
        policy = template["Resources"][f"{name}ScaleOnIteratorAge"]["Properties"]
        metric = policy["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"]
        assert metric["MetricName"] == "GetRecords.IteratorAgeMilliseconds"
        assert metric["Dimensions"] == [{"Name": "StreamName", "Value": {"Ref": stream}}]
        target = template["Resources"][f"{name}Scaling"]["Properties"]
        assert target["MaxCapacity"] == {"Ref": "MaxTasksPerService"}


def test_task_roles_grant_only_what_each_service_calls(template: dict[str, Any]) -> None:
    lease_and_dlq = {
        "dynamodb:CreateTable",
        "dynamodb:DescribeTable",
        "dynamodb:Scan",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "kinesis:DescribeStream",
        "kinesis:DescribeStreamSummary",
        "kinesis:PutRecord",
        "kinesis:PutRecords",
    }
    read = {"kinesis:ListShards", "kinesis:GetShardIterator", "kinesis:GetRecords"}
    progress = {"dynamodb:GetItem", "dynamodb:DeleteItem"}  # + Describe/Put/Update, as leases
    expected = {
        "IngestTaskRole": read
        | progress
        | {
            "kinesisvideo:GetDataEndpoint",
            "kinesisvideo:GetMedia",
            "kinesisvideo:GetMediaForFragmentList",
            "kinesisvideo:ListFragments",
            "kms:Decrypt",
        },
        "TranscriberTaskRole": read
        | progress
        | {
            "transcribe:StartStreamTranscription",
            "kinesis:DescribeStreamConsumer",
            "kinesis:SubscribeToShard",
        },
        "RecorderTaskRole": read
        | {
            "dynamodb:GetItem",  # its progress: the upload id and stored parts
            "kms:Decrypt",  # SSE-KMS multipart uploads need both
            "kms:GenerateDataKey",
            "s3:AbortMultipartUpload",
            "s3:DeleteObject",  # the part-1 side object, once the recording is complete
            "s3:DeleteObjectVersion",
            "s3:GetObject",
            "s3:ListBucketMultipartUploads",  # abandoned uploads of a call, to abort
            "s3:PutObject",
            "s3:PutObjectTagging",
        },
        "PersisterTaskRole": read | {"dynamodb:BatchWriteItem"},
        "SentimentTaskRole": read | {"comprehend:DetectSentiment"},
    }
    for role, actions in expected.items():
        assert _actions(template, role) == lease_and_dlq | actions, role


def test_only_transcribe_is_granted_on_every_resource(template: dict[str, Any]) -> None:
    roles = [f"{name}TaskRole" for name in SERVICES] + ["TriggerRole"]
    for role in roles + [f"{name}FunctionRole" for name in LAMBDA_CONSUMERS]:
        for statement in _statements(template, role):
            assert statement["Effect"] == "Allow"
            assert "*" not in str(statement["Action"])
            if statement["Resource"] == "*":
                assert statement["Action"] in NO_RESOURCE_LEVEL_ACTIONS, role


def test_ingest_may_decrypt_a_customer_keyed_kvs_stream_only_through_kvs(
    template: dict[str, Any],
) -> None:
    inline = template["Resources"]["IngestTaskRole"]["Properties"]["Policies"][0]
    conditional = [s for s in inline["PolicyDocument"]["Statement"] if "Fn::If" in s]
    (statement,) = conditional
    condition, granted, otherwise = statement["Fn::If"]
    assert condition == "HasKvsKmsKey" and otherwise == {"Ref": "AWS::NoValue"}
    assert granted["Action"] == "kms:Decrypt"
    assert granted["Resource"] == {"Ref": "KvsKmsKeyArn"}
    via = granted["Condition"]["StringEquals"]["kms:ViaService"]
    assert "kinesisvideo" in str(via)


def test_trigger_lambda_runs_the_ingest_handler_and_only_publishes_calls(
    template: dict[str, Any],
) -> None:
    props = template["Resources"]["TriggerFunction"]["Properties"]
    module, function = props["Handler"].rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), function))
    assert props["Timeout"] <= 8  # Connect's limit for the Invoke AWS Lambda block
    assert _actions(template, "TriggerRole") == {
        "kinesis:PutRecord",
        "kinesis:PutRecords",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    }
    permission = template["Resources"]["TriggerPermission"]["Properties"]
    assert permission["Principal"] == "connect.amazonaws.com"


def _container_env(template: dict[str, Any], name: str) -> dict[str, str]:
    task = template["Resources"][f"{name}Task"]["Properties"]
    env: dict[str, str] = {}
    for item in task["ContainerDefinitions"][0]["Environment"]:
        value = item["Value"]
        # Stand-ins for what CloudFormation resolves at deploy time.
        if not isinstance(value, str):
            value = "us-east-1" if item["Name"].endswith("REGION") else "stack-resource-name"
        env[item["Name"]] = value
    return env


def test_every_task_environment_is_valid_for_its_service(template: dict[str, Any]) -> None:
    fake = {"CALLSTREAM_TRANSCRIPT_TTL_DAYS": "7"}
    fake |= {"CALLSTREAM_ASR_ENGINE": "transcribe", "SAVE_PARTIAL_TRANSCRIPTS": "FALSE"}
    fake |= {"CALLSTREAM_SENTIMENT_ENGINE": "comprehend", "RECORDINGS_FORMAT": "stereo"}
    fake |= {
        "RECORDINGS_KMS_KEY_ID": "arn:aws:kms:us-east-1:123456789012:key/"
        "1234abcd-12ab-34cd-56ef-1234567890ab"
    }
    factories = {
        "Ingest": IngestSettings.from_env,
        "Transcriber": TranscriberSettings.from_env,
        "Recorder": RecorderSettings.from_env,
        "Persister": PersisterSettings.from_env,
        "Sentiment": SentimentSettings.from_env,
    }
    for name, factory in factories.items():
        env = _container_env(template, name)
        env |= {k: v for k, v in fake.items() if k in env}
        factory(env)  # raises ConfigError naming the variable if one is wrong


def test_the_transcriber_reads_audio_with_its_own_fan_out_consumer_and_the_recorder_polls(
    template: dict[str, Any],
) -> None:
    consumer = template["Resources"]["TranscriberConsumer"]
    assert consumer["Type"] == "AWS::Kinesis::StreamConsumer"
    assert consumer["Properties"]["StreamARN"] == {"Fn::GetAtt": ["AudioStream", "Arn"]}
    name = consumer["Properties"]["ConsumerName"]
    transcriber = _container_env(template, "Transcriber")
    assert transcriber["CALLSTREAM_READ_MODE"] == "efo"
    assert transcriber["CALLSTREAM_EFO_CONSUMER_NAME"] == name
    assert template["Resources"]["TranscriberService"]["DependsOn"] == "TranscriberConsumer"
    (fan_out,) = [
        s
        for s in _statements(template, "TranscriberTaskRole")
        if "kinesis:SubscribeToShard" in s["Action"]
    ]
    assert fan_out["Resource"] == {"Fn::Sub": f"${{AudioStream.Arn}}/consumer/{name}:*"}
    recorder = _container_env(template, "Recorder")
    assert recorder.get("CALLSTREAM_READ_MODE", "polling") == "polling"
    assert recorder["CALLSTREAM_POLL_GROUPS"] == "1"  # the audio stream's only polling group
    for service in ("Ingest", "Persister", "Sentiment"):
        assert "CALLSTREAM_READ_MODE" not in _container_env(template, service)


def test_the_sentiment_consumer_is_optional_and_calls_comprehend_only_when_chosen(
    template: dict[str, Any],
) -> None:
    optional = [k for k, v in template["Resources"].items() if k.startswith("Sentiment")]
    assert len(optional) == 10
    conditions = {template["Resources"][k]["Condition"] for k in optional}
    assert conditions == {"DeploySentiment", "SentimentOnFargate", "SentimentOnLambda"}
    deploy = template["Conditions"]["DeploySentiment"]
    for name in ("SentimentOnFargate", "SentimentOnLambda"):
        assert deploy in template["Conditions"][name]["Fn::And"]
    inline = template["Resources"]["SentimentTaskRole"]["Properties"]["Policies"][0]
    (conditional,) = [s for s in inline["PolicyDocument"]["Statement"] if "Fn::If" in s]
    assert conditional["Fn::If"][0] == "SentimentUsesComprehend"
    table = template["Resources"]["SentimentTable"]["Properties"]
    assert [k["AttributeName"] for k in table["KeySchema"]] == ["ContactId", "SegmentId"]


def test_the_consumers_run_either_on_fargate_or_on_lambda(template: dict[str, Any]) -> None:
    conditions = template["Conditions"]
    assert conditions["ConsumersOnLambda"] == {"Fn::Equals": [{"Ref": "ConsumerRuntime"}, "lambda"]}
    assert template["Parameters"]["ConsumerRuntime"]["Default"] == "fargate"
    for kind in ("TaskRole", "Task", "Service", "Scaling", "ScaleOnIteratorAge"):
        assert template["Resources"][f"Persister{kind}"]["Condition"] == "ConsumersOnFargate"
        assert template["Resources"][f"Sentiment{kind}"]["Condition"] == "SentimentOnFargate"
    for kind in ("FunctionRole", "FunctionLogGroup", "Function", "EventSourceMapping"):
        assert template["Resources"][f"Persister{kind}"]["Condition"] == "ConsumersOnLambda"
        assert template["Resources"][f"Sentiment{kind}"]["Condition"] == "SentimentOnLambda"


@pytest.mark.parametrize("name", LAMBDA_CONSUMERS)
def test_each_lambda_consumer_reports_batch_item_failures_and_sends_given_up_batches_to_sqs(
    template: dict[str, Any], name: str
) -> None:
    mapping = template["Resources"][f"{name}EventSourceMapping"]["Properties"]
    assert mapping["EventSourceArn"] == {"Fn::GetAtt": ["TranscriptsStream", "Arn"]}
    assert mapping["FunctionName"] == {"Ref": f"{name}Function"}
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["BisectBatchOnFunctionError"] is True
    assert mapping["MaximumRecordAgeInSeconds"] == {"Ref": "LambdaMaxRecordAgeSeconds"}
    # A Kinesis mapping's on-failure destination may be SQS, SNS or S3, never a stream.
    destination = mapping["DestinationConfig"]["OnFailure"]["Destination"]
    assert destination == {"Fn::GetAtt": ["ConsumerFailureQueue", "Arn"]}
    assert template["Resources"]["ConsumerFailureQueue"]["Type"] == "AWS::SQS::Queue"
    function = template["Resources"][f"{name}Function"]["Properties"]
    assert function["Handler"] == f"services.{name.lower()}.lambda_function.lambda_handler"
    assert function["Role"] == {"Fn::GetAtt": [f"{name}FunctionRole", "Arn"]}


def test_lambda_consumer_roles_grant_only_what_the_mapping_and_the_handler_call(
    template: dict[str, Any],
) -> None:
    mapping = {
        "kinesis:DescribeStream",
        "kinesis:DescribeStreamSummary",
        "kinesis:ListShards",
        "kinesis:GetShardIterator",
        "kinesis:GetRecords",
        "sqs:SendMessage",
    }
    common = mapping | {
        "kinesis:PutRecord",  # dead letters
        "kinesis:PutRecords",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    }
    expected = {
        "PersisterFunctionRole": common | {"dynamodb:PutItem", "dynamodb:BatchWriteItem"},
        "SentimentFunctionRole": common | {"dynamodb:PutItem", "comprehend:DetectSentiment"},
    }
    for role, actions in expected.items():
        assert _actions(template, role) == actions, role
    # No leases, no table creation: the mapping keeps the positions, the stack makes the tables.
    persister = _statements(template, "PersisterFunctionRole")
    (rows,) = [s for s in persister if s.get("Sid") == "WriteRows"]
    assert rows["Resource"] == [
        {"Fn::GetAtt": ["CustomerTranscriptTable", "Arn"]},
        {"Fn::GetAtt": ["AgentTranscriptTable", "Arn"]},
    ]
