"""A recording worker process: receives and writes the recording legs the pool gives it.

Run by `signaling.recording.pool` as `python -m signaling.recording.worker`; never by hand.
It speaks JSON lines with its parent over stdin (requests) and the original stdout (replies and
progress); its fd 1 is pointed at stderr so that nothing printed by a library can corrupt the
channel. Each leg is a one-role `RecordingSession` here, so the media path, the files, their
names and format are exactly those of an in-process recorder (docs/recording.md).

Requests `{"id": n, "op": ..., ...}`, answered `{"id": n, "ok": result}` or
`{"id": n, "error": "...", "refused": bool}` (`refused`: a `RecordingError`, the client's
fault; otherwise the worker's):

- `offer` (`leg`, `directory`, `role`, `sdp`, `label`, `ice_servers`, `relay_only`,
  `pli_interval_s`, `video_wait_s`) -> the SDP answer;
- `candidate` (`leg`, `role`, `candidate`) -> null;
- `close` (`leg`) -> the leg's files (`RecordingFile.as_dict()`), the leg forgotten;
- `status` -> {leg: status}.

Every `PROGRESS_S` it sends `{"progress": {leg: {"status", "files", "open"}}}`: the files
finished so far and the one being written (path, start, tracks), so that the parent can
describe them if this process dies. End of stdin (the parent is gone or closing): every leg
is finished properly, then the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from typing import Any

from signaling.recording.session import DRAIN_S, RecordingError, RecordingSession, drain

log = logging.getLogger("signaling.recording.worker")

PROGRESS_S = 1.0
LINE_LIMIT = 16 << 20


class Worker:
    def __init__(self, out: asyncio.StreamWriter) -> None:
        self.out = out
        self.legs: dict[str, RecordingSession] = {}
        self.tasks: set[asyncio.Task[Any]] = set()

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def handle(self, request: dict[str, Any]) -> None:
        rid = request.get("id")
        try:
            result = await self.dispatch(request)
        except RecordingError as exc:
            self.send({"id": rid, "error": str(exc), "refused": True})
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            self.send({"id": rid, "error": f"{type(exc).__name__}: {exc}", "refused": True})
        except Exception as exc:
            log.exception("recording worker: %s failed", request.get("op"))
            self.send({"id": rid, "error": f"{type(exc).__name__}: {exc}", "refused": False})
        else:
            self.send({"id": rid, "ok": result})
        await self.out.drain()

    async def dispatch(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        if op == "offer":
            leg = str(request["leg"])
            if leg in self.legs:
                raise RecordingError("leg exists")
            session = RecordingSession(
                request["directory"],
                ice_servers=request.get("ice_servers") or [],
                relay_only=bool(request.get("relay_only")),
                pli_interval_s=float(request.get("pli_interval_s", 5.0)),
                video_wait_s=float(request.get("video_wait_s", 3.0)),
                label=str(request.get("label", "")),
                drain=False,  # drain_forever muxes every leg of this worker in one hand-off
            )
            self.legs[leg] = session
            try:
                return await session.add_participant_offer(request["role"], request["sdp"])
            except Exception:
                self.legs.pop(leg, None)
                await session.close()
                raise
        if op == "candidate":
            session = self.legs.get(str(request["leg"]))
            if session is None:
                raise RecordingError("no recording leg for this role")
            await session.add_ice_candidate(request["role"], request.get("candidate"))
            return None
        if op == "close":
            session = self.legs.pop(str(request["leg"]), None)
            if session is None:
                return []
            return [f.as_dict() for f in await session.close()]
        if op == "status":
            return {leg: session.status() for leg, session in self.legs.items()}
        raise RecordingError(f"unknown request {op!r}")

    def progress(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        for leg, session in self.legs.items():
            current = None
            for role, live in session._legs.items():
                writer = live.writer
                if writer.path is not None:
                    current = {
                        "role": role,
                        "path": str(writer.path),
                        "started_at": writer.started_at,
                        "tracks": [s.as_dict() for k, s in writer.stats.items() if k in writer._streams],
                    }
            report[leg] = {
                "status": session.status(),
                "files": [f.as_dict() for f in session.files],
                "open": current,
            }
        return report

    async def report_forever(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_S)
            if self.legs:
                self.send({"progress": self.progress()})
                await self.out.drain()

    async def drain_forever(self) -> None:
        while True:
            await asyncio.sleep(DRAIN_S)
            writers = [w for session in self.legs.values() for w in session.writers()]
            if writers:
                try:
                    await asyncio.to_thread(drain, writers)
                except Exception:
                    log.exception("recording worker: muxing failed")

    async def close_all(self) -> None:
        legs, self.legs = list(self.legs.values()), {}
        await asyncio.gather(*(s.close() for s in legs), return_exceptions=True)


async def serve() -> None:
    loop = asyncio.get_running_loop()
    # The channel is the original stdout; fd 1 now goes to stderr (stray prints, C libraries).
    channel = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, channel)
    out = asyncio.StreamWriter(transport, protocol, None, loop)
    worker = Worker(out)
    reporter = loop.create_task(worker.report_forever())
    drainer = loop.create_task(worker.drain_forever())
    worker.send({"ready": os.getpid()})
    try:
        while line := await reader.readline():
            try:
                request = json.loads(line)
            except ValueError:
                log.error("recording worker: unreadable request")
                continue
            task = loop.create_task(worker.handle(request))
            worker.tasks.add(task)
            task.add_done_callback(worker.tasks.discard)
    finally:
        reporter.cancel()
        drainer.cancel()
        if worker.tasks:
            await asyncio.gather(*worker.tasks, return_exceptions=True)
        await worker.close_all()
        with contextlib.suppress(Exception):
            transport.close()


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, format=f"recording-worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve())


if __name__ == "__main__":
    main()
