"""The event bus: Kinesis Data Streams producer and consumer, and an in-memory twin."""
