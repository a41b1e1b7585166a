"""The access log against whatever bytes arrive, over a real socket to a real `consult serve`:
a malformed request line, an oversized header, a non-UTF-8 path, no match_info. Each gets a log
line (no traceback), nothing forges a line, and the server keeps serving."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from consult.core import logs
from consult.core.logs import RedactingAccessLogger
from tests.test_edge import connect, get, log_text, read_all

HOSTILE_REQUESTS = [
    b"GARBAGE\r\n\r\n",
    b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    b"GET /%ff%fe%0a%1b[31mFAKE HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS hello on the plain port
    b"GET / HTTP/9.9\r\n\r\n",
    b"\r\n\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(300)) + b"\r\n",
]


async def test_access_log_survives_any_request_and_the_server_keeps_serving(consult_server_factory) -> None:
    server = await consult_server_factory(demo=False)

    def run() -> list[bytes]:
        answers = []
        for raw in HOSTILE_REQUESTS:
            with connect(server, timeout=2) as s:  # some leave the connection open: read until then
                s.sendall(raw)
                answers.append(read_all(s))
            assert get(server).startswith(b"HTTP/1.1 200")
        return answers

    answers = await asyncio.to_thread(run)
    await asyncio.sleep(0.3)
    text = log_text(server)
    assert "AssertionError" not in text and "Unhandled exception" not in text, text[-4000:]
    access = [line for line in text.splitlines() if "aiohttp.access" in line]
    # One access line per hostile request that got an answer (plus the health checks).
    answered = [a for a in answers if a.startswith(b"HTTP/")]
    assert len(answered) >= 8
    assert sum(1 for line in access if '" 400 ' in line) >= len([a for a in answered if b" 400 " in a[:20]])
    # The percent-encoded newline and escape stay encoded: no forged line, no terminal escape.
    assert not any(line.startswith("FAKE") for line in text.splitlines())
    assert "\x1b" not in text
    for answer in answered:
        head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        assert "aiohttp" not in head and "Python" not in head, head


def test_a_request_without_match_info_is_logged(settings) -> None:
    """What aiohttp hands the logger for a request it refused: a Request with no app."""
    request = make_mocked_request("GET", "/\x1b[31m%0aFAKE")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.access.bare")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    RedactingAccessLogger(logger, "").log(request, web.Response(status=400), 0.001)
    message = records[0].getMessage()
    assert "\x1b" not in message and "\n" not in message and " 400 " in message


def test_an_access_record_is_what_make_record_makes_and_formats_alike(settings) -> None:
    """The access line's record is built from a copy (`_access_record`): every attribute a
    formatter may name is what logger.makeRecord gives, and the once-a-second time format
    (`PlainFormatter`) writes what logging.Formatter writes."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.access.copied")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    access = RedactingAccessLogger(logger, "")
    for path, status in (("/book/hold", 303), ("/call/abcdefghijkl", 200), ("/x?token=secret", 404)):
        access.log(make_mocked_request("POST", path), web.Response(status=status), 0.0123)
    args = ("127.0.0.1", "POST", "/p", 303, 1.0)
    made = logger.makeRecord(logger.name, logging.INFO, logs.__file__, 0, logs.ACCESS_FORMAT, args, None)
    assert len(records) == 3
    for record in records:
        mine = {
            k: v
            for k, v in vars(record).items()
            if k not in ("created", "msecs", "relativeCreated", "args", "http")
        }
        theirs = {
            k: v for k, v in vars(made).items() if k not in ("created", "msecs", "relativeCreated", "args")
        }
        assert mine == theirs
        assert abs(record.created - made.created) < 5 and 0 <= record.msecs < 1000
        assert (
            abs((record.relativeCreated - made.relativeCreated) - (record.created - made.created) * 1000) < 1
        )
    assert [r.getMessage() for r in records] == [
        'None "POST /book/hold" 303 12.3ms',
        'None "POST /call/abcdef…" 200 12.3ms',
        'None "POST /x?token=secr…" 404 12.3ms',
    ]
    assert records[0].http == {
        "remote": None,
        "method": "POST",
        "path": "/book/hold",
        "status": 303,
        "ms": 12.3,
    }
    fmt = "%(asctime)s %(levelname)s %(name)s %(module)s %(threadName)s: %(message)s"
    plain, fast = logging.Formatter(fmt), logs.PlainFormatter(fmt)
    for record in [*records, made]:
        for shift in (0, 0.5, 1.25, 3600):
            record.created += shift
            record.msecs = int((record.created - int(record.created)) * 1000) + 0.0
            assert fast.format(record) == plain.format(record)
