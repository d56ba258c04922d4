"""A hostile registry cannot make the fetcher hold a response body bigger than what was asked.

A raw loopback HTTP server answers every request with a body of up to 256 MiB (chunked, so that
no Content-Length warns the client): a 206 for 10 bytes, multipart bodies whose boundary never
comes or whose part is elsewhere, a 200 for a blob the descriptor says has 1000 bytes, the 0-1
probe, a token response. The client runs in a subprocess so that its peak memory can be measured
on its own: each read must fail (or return what was asked) with its peak RSS growing by no more
than a bound far below the bodies' size, and without draining them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

SIZE = 1 << 30  # what the descriptor says, for range reads
SMALL = 1000  # what the descriptor says, for whole-blob reads
CHUNK = 64 << 10
ENDLESS = 256 << 20  # the most a hostile body sends (if the client kept reading); no line ends in it
RSS_BOUND_KIB = 48 << 10  # the client's peak RSS may grow by this much over all cases
DIGEST = "sha256:" + "ab" * 32
BOUNDARY = "XYZ"

# case -> (operation, descriptor size, ranges)
CASES = {
    "chunked206": ("ranges", SIZE, [(0, 10)]),
    "coalesced_far": ("ranges", SIZE, [(100, 110)]),
    "preamble": ("ranges", SIZE, [(0, 10), (20, 30)]),
    "elsewhere": ("ranges", SIZE, [(0, 10), (20, 30)]),
    "framing": ("ranges", SIZE, [(0, 10), (20, 30)]),
    "whole": ("ranges", SMALL, [(0, 10)]),
    "readall": ("all", SMALL, []),
    "probe": ("ranges", SIZE, [(0, 10)]),
    "token": ("ranges", SIZE, [(0, 10)]),
}


class HostileRegistry:
    """Answers as the case named by the repository says; counts the body bytes it got out."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                fields = (line.partition(":") for line in lines[1:] if line)
                headers = {name.lower(): value.strip() for name, _, value in fields}
                await self.answer(path, headers, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def answer(self, path: str, headers: dict[str, str], writer: asyncio.StreamWriter) -> None:
        if path.startswith("/token"):
            json_type = "Content-Type: application/json\r\n"
            return await self.endless("token", writer, "200 OK", json_type, b'{"token": "')
        case = path.split("/")[2]
        probe = headers.get("range") == "bytes=0-1"
        if case == "token" and "authorization" not in headers:
            realm = f"http://127.0.0.1:{self.port}/token"
            writer.write(
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n"
                + f'WWW-Authenticate: Bearer realm="{realm}",service="x"\r\n\r\n'.encode()
            )
            return await writer.drain()
        if probe and case != "probe":
            writer.write(f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-1/{SIZE}\r\n".encode())
            writer.write(b"Content-Length: 2\r\n\r\nab")
            return await writer.drain()
        multipart = f"Content-Type: multipart/byteranges; boundary={BOUNDARY}\r\n"
        partial = "206 Partial Content"
        if case in ("chunked206", "probe"):
            return await self.endless(case, writer, partial, f"Content-Range: bytes 0-9/{SIZE}\r\n")
        if case == "coalesced_far":  # a part that starts long before the bytes asked for
            return await self.endless(case, writer, partial, f"Content-Range: bytes 0-{SIZE - 1}/{SIZE}\r\n")
        if case == "preamble":  # the boundary never comes
            return await self.endless(case, writer, partial, multipart)
        if case == "elsewhere":  # one endless part of bytes nobody asked for
            first = f"--{BOUNDARY}\r\nContent-Range: bytes 1000000-{SIZE - 1}/{SIZE}\r\n\r\n".encode()
            return await self.endless(case, writer, partial, multipart, first)
        if case == "framing":  # part headers that never end
            first = f"--{BOUNDARY}\r\nContent-Range: bytes 0-9/{SIZE}\r\nX-Padding: ".encode()
            return await self.endless(case, writer, partial, multipart, first)
        return await self.endless(case, writer, "200 OK", "")  # whole, readall

    async def endless(
        self, case: str, writer: asyncio.StreamWriter, status: str, headers: str, first: bytes = b""
    ) -> None:
        writer.write(f"HTTP/1.1 {status}\r\n{headers}Transfer-Encoding: chunked\r\n\r\n".encode())
        filler = b"a" * CHUNK
        sent = 0
        while sent < ENDLESS:
            data = first + filler if not sent else filler
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
            sent += len(data)
            self.sent[case] = self.sent.get(case, 0) + len(data)
        writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.fixture
async def hostile() -> AsyncIterator[HostileRegistry]:
    reg = HostileRegistry()
    server = await asyncio.start_server(reg.handle, "127.0.0.1", 0)
    reg.port = server.sockets[0].getsockname()[1]
    try:
        yield reg
    finally:
        server.close()
        await server.wait_closed()


CLIENT = textwrap.dedent(
    """
    import asyncio, json, sys
    from snapshotter.fetcher import CredentialStore, FetchError, HostsConfig, RegistryClient

    def peak_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    async def main(host, cases):
        out = {}
        client = RegistryClient(
            HostsConfig(None), CredentialStore(), max_retries=1, retry_base_delay=0.001, timeout=10
        )
        async with client:
            base = peak_kib()
            for case, (op, size, ranges) in cases.items():
                blob = client.blob(f"{host}/{case}", DIGEST, size)
                try:
                    ranges = [tuple(r) for r in ranges]
                    got = await (blob.read_all() if op == "all" else blob.read_ranges(ranges))
                    outcome = f"ok: {sum(len(b) for b in got)} bytes"
                except FetchError as e:
                    outcome = f"{type(e).__name__}: {e}"
                out[case] = {"outcome": outcome, "growth_kib": peak_kib() - base}
        print(json.dumps(out))

    DIGEST = sys.argv[3]
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
    """
)


async def test_hostile_bodies_are_never_held(hostile: HostileRegistry) -> None:
    root = str(Path(__file__).resolve().parents[3])  # the code under test, whatever the cwd
    env = {**os.environ, "PYTHONPATH": root}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        f"127.0.0.1:{hostile.port}",
        json.dumps(CASES),
        DIGEST,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=root,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    results = json.loads(out)
    print(json.dumps(results, indent=1), hostile.sent)
    assert set(results) == set(CASES)
    for case, result in results.items():
        # Every hostile answer is refused (a 206 for 10 bytes that goes on is not taken either).
        assert not result["outcome"].startswith("ok"), (case, result)
        assert "Error" in result["outcome"], (case, result)
        assert result["growth_kib"] <= RSS_BOUND_KIB, (case, result)
        # The client hung up long before the end of the body (two attempts each).
        assert hostile.sent.get(case, 0) < ENDLESS // 4, (case, hostile.sent)
    assert "token server" in results["token"]["outcome"]
    assert "multipart framing is longer" in results["framing"]["outcome"]
