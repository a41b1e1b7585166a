"""Recording legs spread over worker processes, so that one event loop is not the ceiling.

A recording leg costs aiortc's per-packet work (SRTP, jitter buffer, depacketizing) on the
event loop that owns its sockets; in one process that loop saturates near 50 visits on two
cores (docs/recording.md, Measurements). `RecordingPool` runs `size` worker processes
(`signaling.recording.worker`, default one per CPU core), started on the first leg, and gives
each new leg to the worker with the fewest live legs. The signaling server talks to each over
its stdin/stdout pipes (JSON lines); the worker owns the leg's UDP sockets and writes its file,
exactly as an in-process `RecordingSession` would (same files, names, format).

`PooledRecordingSession` has `RecordingSession`'s API (the room does not know the
difference). A worker that dies (killed, crashed, out of memory) fails its legs cleanly: the
call is peer to peer and goes on; each of its legs' files is reported on `close()` with
`complete = False` and the reason (the application stores the row as incomplete and repairs
the cut file at its next start); the pool starts a new worker in its place, which takes new
legs (the browser offers a new leg when its recording connection fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signaling.recording.errors import RecordingError, check_offer

# aiortc and PyAV are imported on the first leg, not when the application starts.
if TYPE_CHECKING:
    from aiortc import RTCIceServer

    from signaling.recording.writer import RecordingFile

log = logging.getLogger(__name__)

LINE_LIMIT = 16 << 20
# A worker that dies again within this long after starting is restarted no sooner than this.
RESTART_BACKOFF_S = 1.0
WORKER_DIED = "the recording worker process stopped"
# The directory holding the `signaling` package: the workers import this very code.
_ROOT = str(Path(__file__).resolve().parents[2])


class WorkerDied(Exception):
    pass


def _file(d: Mapping[str, Any]) -> RecordingFile:
    from signaling.recording.writer import RecordingFile

    return RecordingFile(
        role=d["role"],
        path=Path(d["path"]),
        started_at=float(d["started_at"]),
        duration_s=float(d["duration_s"]),
        size=int(d["size"]),
        sha256=d["sha256"],
        tracks=tuple(d["tracks"]),
        complete=bool(d.get("complete", True)),
        error=d.get("error"),
    )


def _salvage(leg: _RemoteLeg) -> list[RecordingFile]:
    """The files a dead worker left for `leg`: those it finished, as it reported them, and the
    one it was writing, described from the disk (incomplete: no cues, cut at the crash)."""
    from signaling.recording.writer import RecordingFile

    files = [_file(d) for d in leg.files]
    current = leg.open
    if current and not any(str(f.path) == current["path"] for f in files):
        path = Path(current["path"])
        digest = hashlib.sha256()
        size = 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError:
            return files
        tracks = tuple(current.get("tracks") or ())
        starts = [t["start_s"] for t in tracks if t.get("start_s") is not None]
        duration = max(0.0, time.time() - float(current.get("started_at") or time.time()))
        files.append(
            RecordingFile(
                role=current["role"],
                path=path,
                started_at=float(current.get("started_at") or time.time()),
                duration_s=round(duration - (min(starts) if starts else 0.0), 3),
                size=size,
                sha256=digest.hexdigest(),
                tracks=tracks,
                complete=False,
                error=WORKER_DIED,
            )
        )
    return files


@dataclass(eq=False)
class _RemoteLeg:
    id: str
    role: str
    worker: _Worker
    files: list[dict[str, Any]] = field(default_factory=list)
    open: dict[str, Any] | None = None
    status: dict[str, Any] = field(default_factory=dict)
    closed: bool = False


class _Worker:
    """One worker process and its pipe."""

    def __init__(self, pool: RecordingPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.legs: dict[str, _RemoteLeg] = {}
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count(1)
        self.alive = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.started_at = time.monotonic()
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "signaling.recording.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=LINE_LIMIT,
        )
        self.alive = True
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                message = json.loads(line)
                if "id" in message:
                    future = self.pending.pop(message["id"], None)
                    if future is not None and not future.done():
                        future.set_result(message)
                elif "progress" in message:
                    for leg_id, report in message["progress"].items():
                        leg = self.legs.get(leg_id)
                        if leg is not None:
                            leg.files, leg.open = report["files"], report["open"]
                            leg.status = report["status"]
                elif "ready" in message and not self.ready.done():
                    self.ready.set_result(None)
        except Exception:
            log.exception("recording worker %s: unreadable reply", self.pid)
        finally:
            self._died()

    def _died(self) -> None:
        was_alive, self.alive = self.alive, False
        if self.proc is not None and self.proc.returncode is None and not self.pool.closing:
            # Its channel broke but it runs on (an unreadable reply): it must not keep legs.
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        if not self.ready.done():
            self.ready.set_exception(WorkerDied(WORKER_DIED))
            self.ready.exception()  # retrieved: nobody may be waiting
        for future in self.pending.values():
            if not future.done():
                future.set_exception(WorkerDied(WORKER_DIED))
        self.pending.clear()
        if was_alive and not self.pool.closing:
            log.error(
                "recording worker %s stopped (exit %s); its %d leg(s) are cut, a new worker is started",
                self.pid,
                self.proc.returncode if self.proc else None,
                sum(not leg.closed for leg in self.legs.values()),
            )
            self.pool._replace(self)

    async def request(self, op: str, **fields: Any) -> Any:
        if not self.alive or self.proc is None or self.proc.stdin is None:
            raise WorkerDied(WORKER_DIED)
        await self.ready
        rid = next(self.ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        try:
            self.proc.stdin.write(json.dumps({"id": rid, "op": op, **fields}).encode() + b"\n")
            await self.proc.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            self.pending.pop(rid, None)
            raise WorkerDied(WORKER_DIED) from exc
        reply = await future
        if "error" in reply:
            if reply.get("refused"):
                raise RecordingError(reply["error"])
            raise RuntimeError(reply["error"])
        return reply["ok"]

    async def stop(self, timeout: float = 15.0) -> None:  # noqa: ASYNC109
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class RecordingPool:
    """`size` recording worker processes (default: one per CPU core), started on first use."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size if size and size > 0 else (os.cpu_count() or 1)
        self.workers: list[_Worker] = []
        self.closing = False
        self.restarts = 0
        self._leg_ids = itertools.count(1)
        self._starting: asyncio.Lock | None = None
        self._restarting: set[asyncio.Task[None]] = set()

    def session(
        self,
        directory: Path | str,
        *,
        ice_servers: Iterable[RTCIceServer | Mapping[str, Any]],
        relay_only: bool = False,
        pli_interval_s: float = 5.0,
        video_wait_s: float = 3.0,
        label: str = "",
    ) -> PooledRecordingSession:
        return PooledRecordingSession(
            self,
            directory,
            ice_servers=ice_servers,
            relay_only=relay_only,
            pli_interval_s=pli_interval_s,
            video_wait_s=video_wait_s,
            label=label,
        )

    async def start(self) -> None:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.workers or self.closing:
                return
            for index in range(self.size):
                worker = _Worker(self, index)
                await worker.start()
                self.workers.append(worker)

    def start_soon(self) -> None:
        """Start the workers in the background (e.g. when the server starts)."""

        def done(task: asyncio.Task[None]) -> None:
            self._restarting.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("could not start the recording workers: %s", task.exception())

        task = asyncio.get_running_loop().create_task(self.start())
        self._restarting.add(task)
        task.add_done_callback(done)

    def loads(self) -> list[int]:
        """Live legs per worker (for logs, tests and benchmarks)."""
        return [sum(not leg.closed for leg in w.legs.values()) for w in self.workers]

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None]

    async def pick(self) -> _Worker:
        """The live worker with the fewest live legs."""
        await self.start()
        live = [w for w in self.workers if w.alive]
        if not live:
            raise RecordingError("no recording worker is running")
        return min(live, key=lambda w: (sum(not leg.closed for leg in w.legs.values()), w.index))

    def new_leg_id(self) -> str:
        return str(next(self._leg_ids))

    def _replace(self, dead: _Worker) -> None:
        async def restart() -> None:
            delay = RESTART_BACKOFF_S - (time.monotonic() - dead.started_at)
            if delay > 0:
                await asyncio.sleep(delay)
            if self.closing:
                return
            worker = _Worker(self, dead.index)
            try:
                await worker.start()
            except OSError:
                log.exception("could not restart a recording worker")
                return
            if dead in self.workers:
                self.workers[self.workers.index(dead)] = worker
            self.restarts += 1

        task = asyncio.get_running_loop().create_task(restart())
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def close(self) -> None:
        """Stop every worker (each finishes the legs it still has, then exits)."""
        self.closing = True
        for task in list(self._restarting):
            task.cancel()
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        self.workers.clear()


class PooledRecordingSession:
    """`RecordingSession`'s API, each leg on a worker of the pool (docs/recording.md)."""

    def __init__(
        self,
        pool: RecordingPool,
        directory: Path | str,
        *,
        ice_servers: Iterable[RTCIceServer | Mapping[str, Any]],
        relay_only: bool = False,
        pli_interval_s: float = 5.0,
        video_wait_s: float = 3.0,
        label: str = "",
    ) -> None:
        self.pool = pool
        self.directory = Path(directory)
        self.ice_servers = [self._ice_dict(s) for s in ice_servers]
        self.relay_only = relay_only
        self.pli_interval_s = pli_interval_s
        self.video_wait_s = video_wait_s
        self.label = label
        self.files: list[RecordingFile] = []
        self._legs: dict[str, _RemoteLeg] = {}
        self._closed = False
        self._lock = asyncio.Lock()

    @staticmethod
    def _ice_dict(entry: RTCIceServer | Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(entry, Mapping):
            return dict(entry)
        return {"urls": entry.urls, "username": entry.username, "credential": entry.credential}

    async def add_participant_offer(self, role: str, sdp: str) -> str:
        check_offer(role, sdp)
        async with self._lock:
            if self._closed:
                raise RecordingError("recording is closed")
            old = self._legs.pop(role, None)
            if old is not None:
                await self._finish(old)
            try:
                worker = await self.pool.pick()
                leg = _RemoteLeg(self.pool.new_leg_id(), role, worker)
                worker.legs[leg.id] = leg
                self._legs[role] = leg
                answer = await worker.request(
                    "offer",
                    leg=leg.id,
                    directory=str(self.directory),
                    role=role,
                    sdp=sdp,
                    label=self.label,
                    ice_servers=self.ice_servers,
                    relay_only=self.relay_only,
                    pli_interval_s=self.pli_interval_s,
                    video_wait_s=self.video_wait_s,
                )
            except (WorkerDied, RuntimeError, OSError) as exc:
                self._drop(role)
                raise RecordingError(f"the recorder is unavailable: {exc}") from exc
            except RecordingError:
                self._drop(role)
                raise
            return str(answer)

    def _drop(self, role: str) -> None:
        leg = self._legs.pop(role, None)
        if leg is not None:
            leg.closed = True
            leg.worker.legs.pop(leg.id, None)

    async def add_ice_candidate(self, role: str, candidate: Mapping[str, Any] | None) -> None:
        leg = self._legs.get(role)
        if leg is None:
            raise RecordingError("no recording leg for this role")
        if candidate is not None and not isinstance(candidate, Mapping):
            raise RecordingError("not a candidate")
        try:
            await leg.worker.request("candidate", leg=leg.id, role=role, candidate=candidate)
        except WorkerDied as exc:
            raise RecordingError(str(exc)) from exc

    async def close(self) -> list[RecordingFile]:
        async with self._lock:
            self._closed = True
            legs = list(self._legs.values())
            self._legs.clear()
        # In parallel: each may wait for its worker to read its sockets to the end.
        await asyncio.gather(*(self._finish(leg) for leg in legs))
        return list(self.files)

    def status(self) -> dict[str, Any]:
        """The workers' last reports (at most a second old), per role."""
        out: dict[str, Any] = {}
        for role, leg in self._legs.items():
            report = leg.status.get(role, {"connection": "new", "plis": 0, "tracks": {}})
            out[role] = {**report, "worker": leg.worker.pid, "worker_alive": leg.worker.alive}
        return out

    async def _finish(self, leg: _RemoteLeg) -> None:
        if leg.closed:
            return
        leg.closed = True
        files: list[RecordingFile]
        try:
            files = [_file(d) for d in await leg.worker.request("close", leg=leg.id)]
        except WorkerDied:
            files = await asyncio.to_thread(_salvage, leg)
            log.error("recording %s/%s: worker died; %d file(s) incomplete", self.label, leg.role, len(files))
        except (RecordingError, RuntimeError):
            log.exception("recording %s/%s: the worker could not finish the leg", self.label, leg.role)
            files = await asyncio.to_thread(_salvage, leg)
        finally:
            leg.worker.legs.pop(leg.id, None)
        self.files.extend(files)
