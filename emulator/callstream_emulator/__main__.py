"""`python -m callstream_emulator`: run the embedded emulator until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import logging

from callstream_emulator.emulator import DEFAULT_REGION, DEFAULT_STATE_FILE, run_forever


def main(argv: list[str] | None = None) -> None:
    """Parse options, start the emulator, block until a stop signal."""
    parser = argparse.ArgumentParser(
        prog="python -m callstream_emulator",
        description="moto (Kinesis, DynamoDB, S3, KVS control plane) + KVS media endpoint "
        "on 127.0.0.1; endpoints are printed and written to the state file.",
    )
    parser.add_argument("--port", type=int, default=0, help="moto port (0: any free port)")
    parser.add_argument("--media-port", type=int, default=0, help="KVS media endpoint port")
    parser.add_argument("--region", default=DEFAULT_REGION)
    parser.add_argument("--state-file", default=str(DEFAULT_STATE_FILE))
    parser.add_argument(
        "--fragment-selector-inclusive",
        action="store_true",
        help="GetMedia FRAGMENT_NUMBER starts WITH AfterFragmentNumber (default: after it)",
    )
    parser.add_argument(
        "--get-media-idle-timeout",
        type=float,
        default=1.0,
        help="seconds a GetMedia stays open once no producer is connected",
    )
    parser.add_argument(
        "--no-kinesis-quotas",
        dest="kinesis_quotas",
        action="store_const",
        const=False,
        default=None,
        help="do not enforce Kinesis's per-shard quotas (default: enforced, unless "
        "CALLSTREAM_EMULATOR_KINESIS_QUOTAS=off)",
    )
    parser.add_argument(
        "--subscription-seconds",
        type=float,
        default=None,
        help="how long a SubscribeToShard lasts (default: CALLSTREAM_EMULATOR_SUBSCRIPTION_S "
        "or 300, as on AWS)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    run_forever(
        args.state_file,
        port=args.port,
        media_port=args.media_port,
        region=args.region,
        fragment_selector_inclusive=args.fragment_selector_inclusive,
        get_media_idle_timeout=args.get_media_idle_timeout,
        quiet=not args.verbose,
        kinesis_quotas=args.kinesis_quotas,
        subscription_s=args.subscription_seconds,
    )


if __name__ == "__main__":
    main()
