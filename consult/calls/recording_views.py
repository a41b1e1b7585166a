"""Serving visit recordings: only to the visit's doctor and to admins, with HTTP Range."""

from __future__ import annotations

from aiohttp import web

from consult.audit.reads import audit_read
from consult.calls import playback, recordings
from consult.core import keys, security
from consult.core.errors import NotFound
from consult.core.i18n import _


def setup(app: web.Application) -> None:
    app.router.add_get("/recordings/{recording_id:[0-9]{1,12}}", play_recording, name="recording")


async def play_recording(request: web.Request) -> web.StreamResponse:
    user = security.require(request)
    recording_id = int(request.match_info["recording_id"])
    row = await request.app[keys.DB].execute_fn(lambda db: playback.playable_sync(db, recording_id, user))
    if row is None:  # missing, or not this user's to play: the same answer either way
        raise NotFound(_("No such recording."))
    try:
        path = recordings.stored_path(request.app[keys.SETTINGS].files_dir, row["path"])
    except ValueError:
        raise NotFound(_("No such recording.")) from None
    if not path.is_file():
        raise NotFound(_("This recording's file is missing."))
    range_header = request.headers.get("Range", "")
    if not range_header or range_header.replace(" ", "").startswith("bytes=0-"):
        # One entry per playing: the player's follow-up range requests are the same viewing.
        await audit_read(
            request, "recording.play", "recording", row["id"], row["patient_id"], visit_id=row["visit_id"]
        )
    headers = {
        "Content-Type": "video/x-matroska" if path.suffix == ".mkv" else "video/webm",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "private, no-store",
        "Content-Disposition": f'inline; filename="{path.name}"',
        "Content-Security-Policy": "sandbox; default-src 'none'",
    }
    return web.FileResponse(path, headers=headers)
