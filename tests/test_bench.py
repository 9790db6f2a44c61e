"""The benchmark machinery: the load client (bench/load.py) and the runner (bench/__main__.py).

The load client runs against a real loopback HTTP server that answers each path with
canned bytes: Content-Length and chunked bodies (the way Synapse sends its JSON errors),
garbage, and connections closed mid-answer. Every unexpected answer must be counted as
an error; none may stop the round. The runner must keep the other benchmarks' figures
when one crashes, and say so in its exit status.
"""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import bench.__main__ as bench_main
from bench.load import run_round
from bench.report import Report

ERROR_JSON = b'{"errcode":"M_NOT_FOUND","error":"Not found"}'


def _chunked(status: bytes, pieces: list[bytes], trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n" + trailer + b"\r\n")


ANSWERS: dict[str, bytes | None] = {
    # What Synapse sends for a refused legacy download: a chunked JSON 404.
    "/chunked-404": _chunked(b"404 Not Found", [ERROR_JSON]),
    # Several chunks, a chunk extension and a trailer.
    "/chunked-200": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5;name=value\r\nhello\r\n1000\r\n" + b"x" * 4096 + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"),
    "/length-200": b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + b"b" * 1024,
    "/garbage": b"this is not HTTP\r\n\r\n",
    "/bad-length": b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
    "/truncated-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\nshort",
    "/no-answer": None,  # the server closes the connection without answering
}
# Answers after which the server closes the connection.
CLOSES = {"/garbage", "/bad-length", "/truncated-chunk", "/no-answer"}


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    connections = 0
    lock = threading.Lock()


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        with self.server.lock:
            self.server.connections += 1
        try:
            while True:
                request_line = self.rfile.readline()
                if not request_line:
                    return
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                path = request_line.split()[1].decode()
                answer = ANSWERS[path]
                if answer is not None:
                    self.wfile.write(answer)
                    self.wfile.flush()
                if path in CLOSES:
                    return
        except OSError:
            return


@pytest.fixture
def server() -> Iterator[_Server]:
    # One per test, so a connection accepted late in one test is not counted in the next.
    srv = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def _round(srv: _Server, paths: list[str], expect: int = 200, concurrency: int = 2):  # type: ignore[no-untyped-def]
    return run_round("127.0.0.1", srv.server_address[1], paths, {}, concurrency, 0.3, expect=expect)


def test_chunked_404_is_read_whole_and_keeps_the_connection(server: _Server) -> None:
    # Before the fix this raised, as `make bench` did in B4:
    # ValueError: invalid literal for int() with base 10: b'found"}\r\n0\r\n\r\n'
    # (the chunked body was left unread and taken for the next status line).
    result = _round(server, ["/chunked-404"], expect=404)
    assert result.requests > 2
    assert result.errors == 0, result.error_kinds
    assert result.ok == result.requests
    assert server.connections == 2  # one kept-alive connection per client: bodies fully read


def test_unexpected_status_is_an_error(server: _Server) -> None:
    result = _round(server, ["/chunked-404"], expect=200)
    assert result.requests > 2
    assert result.errors == result.requests
    assert result.error_kinds == {"status 404": result.errors}
    assert result.ok == 0 and result.rate == 0.0


def test_chunked_and_content_length_bodies_alternate_on_one_connection(server: _Server) -> None:
    result = _round(server, ["/chunked-200", "/length-200"], concurrency=1)
    assert result.requests > 2
    assert result.errors == 0, result.error_kinds
    assert server.connections == 1


@pytest.mark.parametrize("path", ["/garbage", "/bad-length", "/truncated-chunk", "/no-answer"])
def test_broken_answers_are_counted_not_raised(server: _Server, path: str) -> None:
    # Mixed with good answers: after a broken one the client reconnects and goes on.
    result = _round(server, [path, "/length-200"])
    assert result.errors > 0
    assert result.ok > 0
    assert result.errors + result.ok == result.requests
    assert all(kind.startswith("bad answer") for kind in result.error_kinds), result.error_kinds
    assert server.connections > 2  # reconnected after each broken answer


def test_nothing_listening_is_an_error_not_a_crash() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        result = run_round("127.0.0.1", port, ["/x"], {}, 2, 0.2)
    assert result.errors > 0
    assert result.ok == 0
    assert set(result.error_kinds) == {"connect failed"}


def test_a_crashing_benchmark_fails_the_run_but_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before the fix the exception left main() and no page was written: B4's crash lost B1's rows.
    def good(report: Report, workdir: Path, quick: bool = False) -> None:
        report.add("BX", "case", "contender", **{"req/s": "123"})

    def broken(report: Report, workdir: Path, quick: bool = False) -> None:
        raise ValueError("invalid literal for int()")

    for name, run in (("fake_bench_broken", broken), ("fake_bench_good", good)):
        module = types.ModuleType(name, f"{name}: a stand-in benchmark.")
        module.run = run  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(bench_main, "BENCHMARKS", {"BY": "fake_bench_broken", "BX": "fake_bench_good"})
    page = tmp_path / "page.md"
    monkeypatch.setattr(sys, "argv", ["bench", "--only", "BY,BX", "--quick", "--output", str(page)])
    assert bench_main.main() == 1
    text = page.read_text()
    assert "| case | contender | 123 |" in text
    assert "**Failed**: crashed with ValueError: invalid literal for int()" in text
    assert "FAILED: BY" in capsys.readouterr().err
