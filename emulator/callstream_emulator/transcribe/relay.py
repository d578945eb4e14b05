"""The TCP relay in front of hypercorn, which can drop one client connection on demand."""

from __future__ import annotations

import asyncio
import logging

_log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class Relay:
    """Forwards TCP connections to hypercorn and can abort one of them on demand.

    Hypercorn reports the relay's upstream socket as the ASGI `client`, so that
    port names the connection to drop.
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._links: dict[int, tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = {}
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._on_client, HOST, 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def ports(self) -> list[int]:
        return list(self._links)

    def drop(self, upstream_port: int) -> None:
        link = self._links.pop(upstream_port, None)
        if link is None:
            _log.warning("no relayed connection from port %s to drop", upstream_port)
            return
        for writer in link:
            writer.transport.abort()

    async def stop(self) -> None:
        for port in list(self._links):
            self.drop(port)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self._upstream_port)
        except OSError:
            writer.transport.abort()
            return
        port = up_writer.get_extra_info("sockname")[1]
        self._links[port] = (writer, up_writer)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._links.pop(port, None)
            writer.transport.abort()
            up_writer.transport.abort()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except OSError:
        sink.transport.abort()
