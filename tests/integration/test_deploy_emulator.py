"""deploy/callstream.yaml deployed to the embedded emulator's CloudFormation (moto).

moto creates the streams, tables, bucket, roles, ECS cluster, task definitions,
services and the trigger Lambda; it does not run Fargate tasks, and it skips
(with a warning, not an error) ApplicationAutoScaling targets and policies and
the bucket policy. It ignores TimeToLiveSpecification, so TTL is not asserted
here (tests/unit/test_deploy_template.py checks it in the template).
"""

from __future__ import annotations

import io
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration
TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "callstream.yaml"


def _deploy(session: Any, name: str, **extra: str) -> dict[str, str]:
    s3 = session.client("s3")
    code_bucket = f"code-{name}"
    s3.create_bucket(Bucket=code_bucket)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(
            "services/ingest/lambda_function.py", "def lambda_handler(e, c):\n    return {}\n"
        )
    for key in ("trigger", "persister", "sentiment"):
        s3.put_object(Bucket=code_bucket, Key=f"callstream/{key}.zip", Body=archive.getvalue())
    ec2 = session.client("ec2")
    parameters = {
        "ImageUri": "callstream:latest",
        "TriggerCodeBucket": code_bucket,
        "VpcId": ec2.describe_vpcs()["Vpcs"][0]["VpcId"],
        "SubnetIds": ec2.describe_subnets()["Subnets"][0]["SubnetId"],
        "KvsKmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/connect-kvs",
        **extra,
    }
    cfn = session.client("cloudformation")
    cfn.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE.read_text(),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
    )
    stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    return {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}


def test_the_template_deploys_to_the_emulator_with_the_reference_tables(
    aws_session: Any,
) -> None:
    outputs = _deploy(aws_session, f"callstream-{uuid.uuid4().hex[:8]}")
    kinesis = aws_session.client("kinesis")
    for key in ("CallsStreamName", "AudioStreamName", "TranscriptsStreamName"):
        summary = kinesis.describe_stream_summary(StreamName=outputs[key])
        assert summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE"
    dynamodb = aws_session.client("dynamodb")
    for key in ("CustomerTranscriptTableName", "AgentTranscriptTableName"):
        table = dynamodb.describe_table(TableName=outputs[key])["Table"]
        assert [k["AttributeName"] for k in table["KeySchema"]] == ["ContactId", "StartTime"]
    aws_session.client("s3").head_bucket(Bucket=outputs["RecordingsBucketName"])
    ecs = aws_session.client("ecs")
    services = ecs.list_services(cluster=outputs["ClusterName"])["serviceArns"]
    assert len(services) == 4
    function = aws_session.client("lambda").get_function(FunctionName=outputs["TriggerFunctionArn"])
    assert function["Configuration"]["Handler"] == "services.ingest.lambda_function.lambda_handler"


def test_with_lambda_consumers_the_persister_and_sentiment_are_functions_on_the_transcripts(
    aws_session: Any,
) -> None:
    name = f"callstream-{uuid.uuid4().hex[:8]}"
    outputs = _deploy(aws_session, name, ConsumerRuntime="lambda", SentimentEngine="offline")
    ecs = aws_session.client("ecs")
    services = ecs.list_services(cluster=outputs["ClusterName"])["serviceArns"]
    names = sorted(s.rsplit("-", 2)[-2] for s in services)
    assert names == ["IngestService", "RecorderService", "TranscriberService"]
    lambdas = aws_session.client("lambda")
    transcripts = aws_session.client("kinesis").describe_stream_summary(
        StreamName=outputs["TranscriptsStreamName"]
    )["StreamDescriptionSummary"]["StreamARN"]
    for consumer in ("persister", "sentiment"):
        function = lambdas.get_function(FunctionName=f"{name}-{consumer}")["Configuration"]
        assert function["Handler"] == f"services.{consumer}.lambda_function.lambda_handler"
        # the Python the zip test runs the built artifacts on (test_deploy_lambdas.py)
        assert function["Runtime"] == f"python{sys.version_info.major}.{sys.version_info.minor}"
    # moto records the mappings as stack resources but does not list them through Lambda.
    resources = aws_session.client("cloudformation").list_stack_resources(StackName=name)
    created = {
        r["LogicalResourceId"]: r["ResourceStatus"] for r in resources["StackResourceSummaries"]
    }
    for consumer in ("Persister", "Sentiment"):
        assert created[f"{consumer}EventSourceMapping"] == "CREATE_COMPLETE"
    assert transcripts.endswith(outputs["TranscriptsStreamName"])
    queue = outputs["ConsumerFailureQueueUrl"]
    aws_session.client("sqs").get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])
