"""The daemon's client of the FUSE manager, against a stand-in manager on a unix socket."""

from __future__ import annotations

import http.server
import json
import os
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter import __version__, fuseclient
from snapshotter.contract import NotLazyError, manager_socket
from snapshotter.fuseclient import FuseManagerClient


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class StandInManager:
    """Answers /version; holds every /mount until ``release`` is set, counting them."""

    def __init__(self, address: Path) -> None:
        self.mounts = 0
        self.release = threading.Event()
        manager = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.answer({"version": __version__, "pid": os.getpid()})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/mount":
                    manager.mounts += 1
                    manager.release.wait(30)
                self.answer({"not_lazy": {"reason": "eager-not-empty", "detail": "late"}})

            def answer(self, body: object) -> None:
                raw = json.dumps(body).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:
                    pass  # the client gave up

            def address_string(self) -> str:
                return "unix"

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = _Server(str(address), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[StandInManager]:
    stand_in = StandInManager(manager_socket(tmp_path))
    try:
        yield stand_in
    finally:
        stand_in.stop()


def test_a_mount_that_times_out_with_the_eager_fallback_is_not_asked_again(
    tmp_path: Path, manager: StandInManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asking again would start the download again: the manager keeps to the timeouts, so a
    client that waited them out reports it."""
    monkeypatch.setattr(fuseclient, "MOUNT_MARGIN_SECONDS", 0.0)
    client = FuseManagerClient(tmp_path, ["false"], mount_timeout=0.2, fill_timeout=0.3)
    with pytest.raises(NotLazyError) as refused:
        client.mount({}, tmp_path / "snapshots" / "1" / "fs")
    assert refused.value.reason == "fuse-manager-timeout"
    assert manager.mounts == 1
