"""Request IDs and log lines: the ID follows a request through its response and every log line."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from service import ROOT, make_settings, serve

import access
from access import client_text, write_access_line
from api import Endpoints
from app import create_app
from logs import REQUEST, access_logger, configure_logging
from logstream import BufferedHandler

pytestmark = pytest.mark.anyio
SECRET = "s3cret-Key-that-is-long-enough-for-prod-000"


chatty_routes = Endpoints(tag="test")


class Nothing(msgspec.Struct):
    pass


@chatty_routes.get("/chatty", summary="Logs, then fails")
async def chatty() -> Nothing:
    logging.getLogger("orders").info("handling the order")
    logging.getLogger("orders").warning("leaking %s by mistake", SECRET)
    raise RuntimeError("boom")


@chatty_routes.get("/boom/{anything}", summary="Fails, whatever the path says")
async def boom(anything: str) -> Nothing:
    raise RuntimeError("boom")


@chatty_routes.get("/healthcare", summary="A route of its own that merely starts like the probes")
async def healthcare() -> Nothing:
    return Nothing()


@chatty_routes.post("/chatty", summary="Reads a body")
async def read_body(body: Nothing) -> Nothing:
    return body


async def run(env: dict[str, str], *requests: tuple[str, dict[bytes, bytes]]) -> list[str]:
    """Serve `requests` and return the response request IDs."""
    app = create_app(make_settings(**env), endpoints=[chatty_routes])
    ids = []
    async with serve(app) as client:
        for path, headers in requests:
            ids.append((await client.get(path, headers=headers)).headers["x-request-id"])
    return ids


@pytest.mark.parametrize("value", ["abc", "A.b_c:d-9", "x" * 128, "550e8400-e29b-41d4-a716-446655440000"])
async def test_valid_incoming_request_id_is_reused(value: str) -> None:
    """An ID matching ^[A-Za-z0-9._:-]{1,128}$ is kept, so callers can trace across services."""
    assert await run({}, ("/health", {b"X-Request-ID": value.encode()})) == [value]


@pytest.mark.parametrize(
    "value", ["", "x" * 129, "has space", 'quote"d', "semi;colon", "<script>", "tab\there", "é", "a/b"]
)
async def test_invalid_incoming_request_id_is_replaced_and_never_logged(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Anything else gets a fresh UUID; the raw value is neither echoed nor logged."""
    [returned] = await run({}, ("/health", {b"X-Request-ID": value.encode()}))
    assert uuid.UUID(returned).version == 4
    if value:
        assert value not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("values", "reused"),
    [(["first", "second"], "second"), (["first", "not valid"], None), (["not valid", "second"], "second")],
)
async def test_of_several_request_id_lines_the_last_is_read(values: list[str], reused: str | None) -> None:
    """A request with more than one `X-Request-ID` line is read by its last, reused only if well formed."""
    app = create_app(make_settings())
    async with serve(app) as client:
        response = await client.get("/health", headers=[("X-Request-ID", value) for value in values])
    returned = response.headers.get_list("x-request-id")
    assert len(returned) == 1
    if reused is None:
        assert uuid.UUID(returned[0]).version == 4
    else:
        assert returned == [reused]


async def test_missing_request_id_gets_a_fresh_uuid_each_time() -> None:
    """No header: a new UUID per request."""
    first, second = await run({}, ("/health", {}), ("/health", {}))
    assert first != second
    assert uuid.UUID(first)
    assert uuid.UUID(second)


async def test_text_logs_carry_the_request_id_on_every_line_of_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    """The handler's lines, the exception and the access line all name the request."""
    await run({}, ("/chatty", {b"X-Request-ID": b"req-42"}))
    lines = [line for line in capsys.readouterr().err.splitlines() if " - " in line]
    handler_lines = [line for line in lines if " - orders - " in line or "service.errors" in line]
    access = [line for line in lines if " - service.access - " in line]
    assert len(handler_lines) == 3
    assert all(line.endswith("[request_id=req-42]") for line in handler_lines)
    assert access == [access[0]]
    assert "GET /chatty 500 " in access[0]
    assert access[0].endswith("[request_id=req-42]")


async def test_json_logs_are_one_object_per_line_with_request_id_and_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """LOG_JSON=true: every line parses, with the contract's keys and the exception's traceback."""
    await run({"LOG_JSON": "true"}, ("/chatty", {b"X-Request-ID": b"req-json"}))
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    in_request = [e for e in entries if e["logger"] in ("orders", "service.errors", "service.access")]
    assert len(in_request) == 4
    for entry in in_request:
        assert {"timestamp", "level", "logger", "message", "request_id"} <= set(entry)
        assert entry["request_id"] == "req-json"
        assert entry["timestamp"].endswith("Z")
    [error] = [e for e in in_request if e["logger"] == "service.errors"]
    assert error["level"] == "ERROR"
    assert "RuntimeError: boom" in error["exception"]
    [access] = [e for e in in_request if e["logger"] == "service.access"]
    assert (access["method"], access["path"], access["status"]) == ("GET", "/chatty", 500)
    assert isinstance(access["duration_ms"], float)
    assert access["client"] == "127.0.0.1:123"


async def test_a_client_gone_before_its_body_arrived_is_a_499_line_not_a_500_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No traceback and no 5xx for a dropped connection: one access line with 499, nginx's status, counted so."""
    app = create_app(make_settings(LOG_JSON="true"), endpoints=[chatty_routes])
    scope = {"type": "http", "method": "POST", "path": "/chatty", "raw_path": b"/chatty", "query_string": b"",
             "root_path": "", "headers": [(b"content-length", b"100")], "client": ("127.0.0.1", 9),
             "state": {}}  # fmt: skip
    sent: list[object] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    async def send(message: object) -> None:
        sent.append(message)

    await app(scope, receive, send)
    async with serve(app) as client:
        metrics = (await client.get("/metrics")).text
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert sent == []  # nobody is listening
    assert [e for e in entries if e["level"] == "ERROR" or "exception" in e] == []
    [access] = [e for e in entries if e["logger"] == "service.access" and e["path"] == "/chatty"]
    assert (access["method"], access["status"]) == ("POST", 499)
    assert 'http_requests_total{method="POST",route="/chatty",status="499"} 1.0' in metrics


async def test_a_path_cannot_forge_a_log_line_through_the_unhandled_exception_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """CR, LF and ESC in the path are escaped in the error line too, as in the access line: no forged line."""
    await run({}, ("/boom/x%0D%0A2026-01-01 00:00:00,000 - service.access - INFO - FORGED%1B[31m", {}))
    err = capsys.readouterr().err
    assert not [line for line in err.splitlines() if line.startswith("2026-01-01")]
    assert "\x1b" not in err
    [error] = [line for line in err.splitlines() if " - service.errors - ERROR - " in line]
    assert "Unhandled exception in GET /boom/x\\r\\n2026-01-01%2000:00:00,000%20-%20service.access" in error


async def test_a_path_cannot_forge_the_fields_after_it_in_the_access_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Spaces in the path are written `%20`: `/x 200 1.00ms client=6.6.6.6 [request_id=forged]` forged fields."""
    await run({}, ("/x%20200%201.00ms%20client=6.6.6.6%20[request_id=forged]", {b"X-Request-ID": b"real-id"}))
    [access] = [line for line in capsys.readouterr().err.splitlines() if " - service.access - " in line]
    assert " - GET /x%20200%201.00ms%20client=6.6.6.6%20[request_id=forged] 404 " in access
    assert access.endswith("[request_id=real-id]")


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_a_valid_traceparent_puts_its_trace_id_on_every_line_of_the_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """W3C `traceparent`: the handler's lines, the exception and the access line carry `trace_id`."""
    headers = {b"X-Request-ID": b"req-trace", b"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01".encode()}
    await run({"LOG_JSON": "true"}, ("/chatty", headers), ("/health", {}))
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    traced = [e for e in entries if e.get("request_id") == "req-trace"]
    assert len(traced) == 4
    assert all(e["trace_id"] == TRACE for e in traced)
    assert not [e for e in entries if "trace_id" in e and e.get("request_id") != "req-trace"]  # not the next request


async def test_text_lines_name_the_trace_beside_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    await run({}, ("/chatty", {b"X-Request-ID": b"req-t", b"traceparent": f"00-{TRACE}-00f067aa0ba902b7-00".encode()}))
    access = [line for line in capsys.readouterr().err.splitlines() if " - service.access - " in line]
    assert access[0].endswith(f"[request_id=req-t trace_id={TRACE}]")


@pytest.mark.parametrize(
    "value",
    [
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace ID
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent ID
        f"00-{TRACE.upper()}-00f067aa0ba902b7-01",  # upper-case hex
        f"ff-{TRACE}-00f067aa0ba902b7-01",  # not version 00
        f"00-{TRACE[:-1]}-00f067aa0ba902b7-01",  # short
        f"00-{TRACE}-00f067aa0ba902b7-01\r\nX-Evil: 1",  # more than a traceparent
        f"00-{TRACE}-00f067aa0ba902b7-01-extra",
    ],
)
async def test_an_invalid_traceparent_is_ignored_and_never_echoed(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    app = create_app(make_settings(LOG_JSON="true"), endpoints=[chatty_routes])
    async with serve(app) as client:
        response = await client.get("/health", headers={"traceparent": value})
    err = capsys.readouterr().err
    assert response.status_code == 200
    assert "trace_id" not in err
    assert value not in err
    assert value not in str(response.headers)


async def test_production_skips_successful_probes_but_logs_failed_ones(capsys: pytest.CaptureFixture[str]) -> None:
    """Probe noise is dropped in production; a failing probe is always logged."""
    env = {"ENVIRONMENT": "production", "SECRET_KEY": SECRET, "DATABASE_URL": "postgresql://u:pw-123456@127.0.0.1:1/x"}
    await run(env, ("/health", {}), ("/health/db", {}), ("/nope", {}))
    access = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"service.access"' in line]
    assert [(a["path"], a["status"]) for a in access] == [("/health/db", 503), ("/nope", 404)]


async def test_production_logs_a_route_that_merely_starts_like_the_probes(capsys: pytest.CaptureFixture[str]) -> None:
    """Only the probes' successes are quiet: `/healthcare` is a route like any other, and is logged."""
    env = {"ENVIRONMENT": "production", "SECRET_KEY": SECRET, "DATABASE_URL": "postgresql://u:pw-123456@127.0.0.1:1/x"}
    await run(env, ("/health", {}), ("/healthcare", {}), ("/health/", {}))
    access = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"service.access"' in line]
    assert [(a["path"], a["status"]) for a in access] == [("/healthcare", 200), ("/health/", 307)]


async def test_a_long_or_hostile_path_and_client_keep_an_access_line_under_pipe_buf(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A path or `X-Forwarded-For` address of any length is cut (ending `…`), so the line is written
    whole on a pipe shared by workers; escaping (ESC as `\\x1b`) and JSON's doubled backslashes included."""
    paths = ["/" + "%1B" * 6000, "/" + "é" * 3000, "/" + "%5C" * 6000]
    await run({"LOG_JSON": "true"}, *((path, {}) for path in paths))
    lines = [line for line in capsys.readouterr().err.splitlines() if '"service.access"' in line]
    assert len(lines) == 3
    for line in lines:
        assert len(line.encode()) + 1 <= select.PIPE_BUF
        assert json.loads(line)["path"].endswith("…")
    assert json.loads(lines[0])["path"].startswith("/\\x1b\\x1b")
    forged = client_text(("6.6.6.6 [request_id=forged] GET /admin 200\x85FAKE" + "x" * 500, 80))
    assert " " not in forged
    assert "\x85" not in forged
    assert forged.endswith("…:80")
    assert len(forged.encode()) <= 128 + len("…:80".encode())


async def test_secrets_are_redacted_from_every_field_of_a_json_access_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A secret in the path is masked in the access line's `path` field too, not only in its message."""
    await run({"SECRET_KEY": SECRET, "LOG_JSON": "true"}, (f"/{SECRET}", {}))
    [access] = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"service.access"' in line]
    assert (access["path"], access["message"].split()[1]) == ("/***", "/***")


def test_a_json_access_line_is_made_by_the_log_writer_with_the_request_s_time_and_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request's thread hands the fields over; the line is made later, on the writer thread,
    with what the request knew: its time, and the trace ID of its context (not the writer's)."""
    made_on = []
    make = access.access_line

    def recorded(*args: Any) -> str:
        made_on.append(threading.current_thread().name)
        return make(*args)

    configure_logging(make_settings(LOG_JSON="true"))
    [ours] = [h for h in logging.getLogger().handlers if isinstance(h, BufferedHandler)]
    with (tmp_path / "log").open("w") as stream:
        handler = BufferedHandler(stream)
        handler.setFormatter(ours.formatter)
        monkeypatch.setattr(logging.getLogger(), "handlers", [handler])  # as in production: nothing else listens
        monkeypatch.setattr(access, "access_line", recorded)
        token = REQUEST.set(("req-1", TRACE))
        before = time.time()
        write_access_line("GET", "/a path", 404, 0.00031, ("127.0.0.1", 5), "req-1")
        after = time.time()
        REQUEST.reset(token)
        assert handler.drain(5)
        handler.close()
    [line] = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert made_on == ["log-writer"]
    assert (line["path"], line["status"], line["request_id"], line["trace_id"]) == ("/a%20path", 404, "req-1", TRACE)
    assert (line["client"], line["duration_ms"]) == ("127.0.0.1:5", 0.31)
    stamped = datetime.datetime.fromisoformat(line["timestamp"]).timestamp()
    assert before - 0.001 <= stamped <= after


def test_a_waiting_access_line_holds_no_more_of_a_long_path_or_client_than_it_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line waits in the buffer (a stuck stream: for seconds) as its fields: a 100 KB path or client
    address is cut before it waits, to what the line writes, and the line is the one `logging` writes."""
    configure_logging(make_settings(LOG_JSON="true"))
    [ours] = [h for h in logging.getLogger().handlers if isinstance(h, BufferedHandler)]
    path, host = "/" + "é\x1b " * 30_000, "6.6.6.6 " * 12_000
    with (tmp_path / "log").open("w") as stream:
        handler = BufferedHandler(stream)
        handler.setFormatter(ours.formatter)
        monkeypatch.setattr(logging.getLogger(), "handlers", [handler])  # as in production: nothing else listens
        waiting: list[tuple[Any, ...]] = []
        enqueue = handler.enqueue_deferred

        def watched(*line: Any) -> None:
            waiting.append(line)
            enqueue(*line)

        monkeypatch.setattr(handler, "enqueue_deferred", watched)
        write_access_line("GET", path, 404, 0.00031, (host, 5), "req-1")
        [(_, fields, size)] = waiting
        assert len(fields[3]) <= access.PATH_BYTES + 1
        assert len(fields[6][0]) <= access.CLIENT_BYTES + 1
        assert size < 2_000
        with monkeypatch.context() as through_logging:  # the record's line, for comparison
            through_logging.setattr(access_logger, "filters", [lambda record: True])
            write_access_line("GET", path, 404, 0.00031, (host, 5), "req-1")
        assert handler.drain(5)
        handler.close()
    direct, logged = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert direct.pop("timestamp")[:19] == logged.pop("timestamp")[:19]
    assert direct == logged
    assert direct["path"].endswith(access.CUT)
    assert direct["client"].endswith(access.CUT + ":5")


async def test_a_secret_sent_as_the_request_or_trace_id_is_masked_in_json_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A valid `X-Request-ID` or `traceparent` is the caller's to choose: one that is a secret is not logged."""
    secret = "0af7651916cd43dd8448eb211c80da77"  # a key of 32 hex digits is also a valid trace ID
    traceparent = f"00-{secret}-b7ad6b7169203331-01"
    await run(
        {"SECRET_KEY": secret, "LOG_JSON": "true"},
        ("/chatty", {b"X-Request-ID": secret.encode(), b"traceparent": traceparent.encode()}),
    )
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "***"]
    assert {line["logger"] for line in mine} >= {"service.access", "orders", "service.errors"}
    assert all(line["trace_id"] == "***" for line in mine)
    assert not [line for line in lines if secret in json.dumps(line)]


def test_a_message_json_cannot_carry_is_escaped_and_its_line_kept() -> None:
    """A lone surrogate (a non-UTF-8 file name, decoded by `os.fsdecode`) in a message and in an
    exception: each line is still one JSON object, the character escaped; nothing is printed outside
    the format. (In a process of its own: pytest's workers cannot ship such text in their reports.)"""
    script = """
import logging, os
from logs import configure_logging
from logstream import finish_logs
from settings import Settings
configure_logging(Settings(log_json=True))
log = logging.getLogger("files")
log.warning(os.fsdecode(b"no file named \\xff here"))
try:
    raise RuntimeError(os.fsdecode(b"cannot open \\xfe"))
except RuntimeError:
    log.exception("reading failed")
finish_logs()
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    warning, error = [json.loads(line) for line in done.stderr.splitlines()]  # every line parses
    assert warning["message"] == "no file named \\udcff here"
    assert "RuntimeError: cannot open \\udcfe" in error["exception"]


def test_warnings_and_exceptions_outside_requests_are_lines_in_the_log_format() -> None:
    """What Python would print on stderr itself (a warning, a coroutine never awaited, a thread's
    exception, an exception in `__del__`, `logging`'s report of a record whose arguments do not fit
    its format) is a JSON line in production, like every other line."""
    script = """
import asyncio, gc, logging, threading, warnings
from logs import configure_logging
from settings import Settings
configure_logging(Settings(log_json=True))
logging.getLogger("orders").warning("count is %d", "abc")
warnings.warn("a deprecated call")
asyncio.sleep(0)  # never awaited
thread = threading.Thread(target=lambda: 1 / 0, name="worker-1")
thread.start(); thread.join()
class Leaky:
    def __del__(self): raise ValueError("in __del__")
Leaky(); gc.collect()
from logstream import finish_logs
finish_logs()
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    entries = [json.loads(line) for line in done.stderr.splitlines()]  # every line is one JSON object
    messages = " | ".join(e["message"] for e in entries)
    assert "UserWarning: a deprecated call" in messages
    assert "coroutine 'sleep' was never awaited" in messages
    assert "Exception in thread worker-1" in messages
    assert any("ZeroDivisionError" in e.get("exception", "") for e in entries)
    assert any("ValueError: in __del__" in e.get("exception", "") for e in entries)
    [report] = [e for e in entries if e["logger"] == "service.logs"]
    assert report["level"] == "ERROR"
    assert report["message"].startswith("A log line of orders could not be formatted (TypeError: ")
    assert "'count is %d'" in report["message"]


async def test_development_logs_successful_probes(capsys: pytest.CaptureFixture[str]) -> None:
    """Outside production every request has its access line."""
    await run({}, ("/health", {}))
    assert "GET /health 200 " in capsys.readouterr().err


async def test_secrets_are_redacted_from_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """A secret that reaches a log message anyway is masked, in text and JSON logs."""
    for log_json in ("false", "true"):
        await run({"SECRET_KEY": SECRET, "LOG_JSON": log_json}, ("/chatty", {}))
        err = capsys.readouterr().err
        assert "leaking *** by mistake" in err
        assert SECRET not in err


async def test_log_level_filters_lower_levels(capsys: pytest.CaptureFixture[str]) -> None:
    """LOG_LEVEL=WARNING drops info lines, access lines included."""
    await run({"LOG_LEVEL": "WARNING"}, ("/chatty", {}))
    err = capsys.readouterr().err
    assert "leaking" in err
    assert "handling the order" not in err
    assert "service.access" not in err


async def test_custom_log_format_can_still_print_process_and_thread(capsys: pytest.CaptureFixture[str]) -> None:
    """Lookups skipped for speed come back when LOG_FORMAT asks for them."""
    await run({"LOG_FORMAT": "%(process)d %(processName)s %(threadName)s %(message)s"}, ("/nope", {}))
    [line] = [line for line in capsys.readouterr().err.splitlines() if "GET /nope 404" in line]
    assert line.startswith(f"{os.getpid()} MainProcess MainThread GET /nope 404 ")


async def test_a_log_format_placing_the_ids_prints_a_dash_where_a_line_has_none(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`%(request_id)s` in LOG_FORMAT printed `None` on every line outside a request (start-up, shutdown),
    and `%(trace_id)s` on every line of a request without a `traceparent`."""
    trace = "0af7651916cd43dd8448eb211c80da77"
    await run(
        {"LOG_FORMAT": "%(request_id)s %(trace_id)s %(name)s %(message)s", "SECRET_KEY": ""},
        ("/nope", {b"X-Request-ID": b"given-id"}),
        ("/nope", {b"X-Request-ID": b"traced-id", b"traceparent": f"00-{trace}-b7ad6b7169203331-01".encode()}),
    )
    lines = capsys.readouterr().err.splitlines()
    assert "- - service SECRET_KEY is not set: using a random key that changes at every start" in lines
    assert any(line.startswith("given-id - service.access GET /nope 404 ") for line in lines)
    assert any(line.startswith(f"traced-id {trace} service.access GET /nope 404 ") for line in lines)
    assert not [line for line in lines if "None" in line]


async def test_a_log_format_placing_only_the_trace_id_appends_the_request_id_as_before(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The request ID still goes in brackets, without a `trace_id=-` the format's own `-` must not add."""
    await run({"LOG_FORMAT": "%(trace_id)s %(name)s %(message)s"}, ("/nope", {b"X-Request-ID": b"req-1"}))
    [line] = [line for line in capsys.readouterr().err.splitlines() if "GET /nope 404" in line]
    assert line.startswith("- service.access GET /nope 404 ")
    assert line.endswith(" [request_id=req-1]")


@pytest.mark.parametrize("line_format", ["%(message)s", "%(message)s trace=%(trace_id)s"])
def test_a_stream_that_stops_draining_drops_and_counts_instead_of_blocking(line_format: str) -> None:
    """Logging into a full, unread pipe returns at once; reading it again brings one line with the count.

    With any valid LOG_FORMAT: one naming the trace ID once made the count's line fail to format,
    and the writer thread died with every line after it.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    filler = 0
    with contextlib.suppress(BlockingIOError):  # the pipe full before the first line, as a stuck reader leaves it
        while True:
            filler += os.write(write_end, b"#" * 4096)
    os.set_blocking(write_end, True)
    handler = BufferedHandler(os.fdopen(write_end, "w"), capacity=4096)
    handler.setFormatter(logging.Formatter(line_format))
    try:
        for i in range(5000):  # 13 bytes or more each: far more than the handler's buffer
            handler.handle(logging.makeLogRecord({"msg": f"line {i:07d}", "request_id": None, "trace_id": None}))
        assert handler.dropped > 0
        received = b""
        while b"were dropped" not in received:
            readable, _, _ = select.select([read_end], [], [], 10)
            assert readable, "the writer stopped writing"  # its thread died: no line ever comes
            received += os.read(read_end, 1 << 16)
        assert handler.drain(5)
        os.set_blocking(read_end, False)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_end, 1 << 16):
                received += chunk
    finally:
        handler.close()
        os.close(read_end)
    lines = received[filler:].decode().splitlines()
    reports = [line for line in lines if "were dropped" in line]
    written = [line for line in lines if line.startswith("line ")]
    assert all(" log lines were dropped: the log stream was not draining" in r for r in reports)
    assert sum(int(r.split()[0]) for r in reports) == handler.dropped
    assert len(written) + handler.dropped == 5000
    assert written == sorted(written)  # what is written keeps its order


def test_a_forked_child_writes_its_own_lines() -> None:
    """A server that forks workers after configuring logging still gets every worker's lines."""
    read_end, write_end = os.pipe()
    handler = BufferedHandler(os.fdopen(write_end, "w"))
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        pid = os.fork()
        if pid == 0:  # the child: its writer thread was started by the fork hook
            handler.handle(logging.makeLogRecord({"msg": "from the child"}))
            os._exit(0 if handler.drain(5) else 1)
        handler.handle(logging.makeLogRecord({"msg": "from the parent"}))
        assert os.waitpid(pid, 0)[1] == 0
        assert handler.drain(5)
    finally:
        handler.close()
    received = b""
    while received.count(b"\n") < 2:
        received += os.read(read_end, 1 << 16)
    os.close(read_end)
    assert sorted(received.decode().splitlines()) == ["from the child", "from the parent"]


def test_write_access_line_writes_what_logging_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct path's JSON line has the same keys and values as the record's, timestamp aside."""
    configure_logging(make_settings(LOG_JSON="true", SECRET_KEY=SECRET))
    [ours] = [h for h in logging.getLogger().handlers if isinstance(h, BufferedHandler)]
    with (tmp_path / "log").open("w") as stream:
        handler = BufferedHandler(stream)
        handler.setFormatter(ours.formatter)
        monkeypatch.setattr(logging.getLogger(), "handlers", [handler])  # as in production: nothing else listens
        with monkeypatch.context() as direct_only:  # the direct path makes no record at all
            direct_only.setattr(access_logger, "makeRecord", None)
            write_access_line("GET", f"/direct/{SECRET}", 404, 0.00031, ("127.0.0.1", 5), "req-1")
        fields = {"method": "GET", "path": f"/direct/{SECRET}", "status": 404, "duration_ms": 0.31,
                  "client": "127.0.0.1:5", "request_id": "req-1"}  # fmt: skip
        args = ("GET", f"/direct/{SECRET}", 404, 0.31, "127.0.0.1:5")
        record = access_logger.makeRecord(access_logger.name, logging.INFO, "f", 0, "%s %s %d %.2fms client=%s",
                                          args, None, "f", fields)  # fmt: skip
        access_logger.handle(record)
        assert handler.drain(5)
        handler.close()
    direct, logged = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert direct.pop("timestamp")[:19] == logged.pop("timestamp")[:19]
    assert direct == logged
    assert direct["message"] == "GET /direct/*** 404 0.31ms client=127.0.0.1:5"  # redacted as any line
    assert direct["path"] == "/direct/***"  # and in its own field, where a log search would find it


def test_write_access_line_goes_through_logging_when_something_else_listens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With another handler (here pytest's capture) the record is made, so that handler sees it too."""
    configure_logging(make_settings(LOG_JSON="true"))
    with caplog.at_level(logging.INFO, logger="service.access"):
        write_access_line("POST", "/x", 201, 0.0015, ("127.0.0.1", 5), "req-2")
    [record] = [r for r in caplog.records if r.name == "service.access"]
    assert record.getMessage() == "POST /x 201 1.50ms client=127.0.0.1:5"
    assert (record.__dict__["status"], record.__dict__["request_id"]) == (201, "req-2")


def test_logging_configured_again_on_a_stuck_stream_waits_for_nothing_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lifespan configures logging again: on a stream that does not drain, the old handler's lines
    move to the new one at once (start-up waited FLUSH_TIMEOUT for them), and reach the stream later."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:  # a stream nobody reads, already full
            os.write(write_end, b"x" * 4096)
    except BlockingIOError:
        os.set_blocking(write_end, True)
    stream = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stderr", stream)
    settings = make_settings(LOG_JSON="true", SECRET_KEY=SECRET)
    try:
        configure_logging(settings)
        logging.getLogger("service.test").warning("before the second configuration")
        started = time.monotonic()
        configure_logging(settings)
        assert time.monotonic() - started < 1
        received = b""
        while b"before the second configuration" not in received:  # the stream drains again
            received += os.read(read_end, 1 << 16)
    finally:
        monkeypatch.undo()
        configure_logging(make_settings())  # the suite's own stream again
        stream.close()
        os.close(read_end)
