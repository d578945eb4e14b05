"""Embedded emulator(s) for the one-command local run and the tests.

`Emulator` (emulator.py) runs moto plus a KVS media endpoint on 127.0.0.1;
`put_media` (kvs_producer.py) is a KVS PutMedia client. Import them from their
modules; this package imports nothing heavy on its own.
"""
