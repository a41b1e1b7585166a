"""Prescriptions: validated items, a numbered document signed with the hospital key, access rules.

The number is allocated, the document built and signed, and the row and its audit entry written
in one write transaction, so numbers are unique, increase in issue order and are never skipped
by a failed write. The stored ``document`` text is the exact canonical JSON that was signed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sqlite3
import time
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import sqlite_utils

from consult.accounts.users import User
from consult.audit import chain as audit
from consult.clinical import signing
from consult.core.db import Database
from consult.core.errors import BadRequest, Conflict, Forbidden, NotFound
from consult.core.i18n import _

FORMAT = "consult-prescription/1"
ISSUABLE_STATUSES = ("confirmed", "completed")
MAX_ITEMS = 20
NUMBER_RE = re.compile(r"^RX-\d{4}-\d{6,}$")
CLIENT_REF_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Field:
    name: str
    max_len: int
    required: bool


FIELDS = (
    Field("drug", 200, True),
    Field("strength", 100, False),
    Field("dose", 100, True),
    Field("frequency", 100, True),
    Field("duration", 100, False),
    Field("quantity", 50, True),
    Field("instructions", 500, False),
)


def _field_label(name: str) -> str:
    return {
        "drug": _("drug"),
        "strength": _("strength"),
        "dose": _("dose"),
        "frequency": _("frequency"),
        "duration": _("duration"),
        "quantity": _("quantity"),
        "instructions": _("instructions"),
    }[name]


class InvalidPrescription(BadRequest):
    """Carries one message per bad field so the form can point at each."""

    code = "invalid_prescription"

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.errors = errors


def _clean(value: Any) -> str | None:
    if value is None:
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = unicodedata.normalize("NFC", value).replace("\r\n", "\n").strip()
    return value


def validate_items(raw: Any) -> list[dict[str, str]]:
    """Return the cleaned items or raise ``InvalidPrescription`` naming every problem."""
    if not isinstance(raw, list) or not raw:
        raise InvalidPrescription(
            _("Add at least one medicine."),
            [{"item": None, "field": None, "message": _("Add at least one medicine.")}],
        )
    if len(raw) > MAX_ITEMS:
        msg = _("A prescription can hold at most %(n)d medicines.") % {"n": MAX_ITEMS}
        raise InvalidPrescription(msg, [{"item": None, "field": None, "message": msg}])
    items: list[dict[str, str]] = []
    errors: list[dict[str, Any]] = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            errors.append(
                {
                    "item": index,
                    "field": None,
                    "message": _("Medicine %(n)d is malformed.") % {"n": index + 1},
                }
            )
            continue
        item: dict[str, str] = {}
        for f in FIELDS:
            value = _clean(entry.get(f.name))
            label = _field_label(f.name)
            problem = None
            if value is None:
                problem = _("Medicine %(n)d: the %(field)s must be text.")
            elif f.required and not value:
                problem = _("Medicine %(n)d: enter the %(field)s.")
            elif len(value) > f.max_len:
                problem = _("Medicine %(n)d: the %(field)s is too long (at most %(max)d characters).")
            elif CONTROL_RE.search(value) or (f.name != "instructions" and "\n" in value):
                problem = _("Medicine %(n)d: the %(field)s contains characters that cannot be printed.")
            if problem:
                errors.append(
                    {
                        "item": index,
                        "field": f.name,
                        "message": problem % {"n": index + 1, "field": label, "max": f.max_len},
                    }
                )
            else:
                item[f.name] = value or ""
        items.append(item)
    if errors:
        raise InvalidPrescription(errors[0]["message"], errors)
    return items


def mask_phone(phone: str | None) -> str:
    if not phone:
        return ""
    if len(phone) < 7:
        return "*" * len(phone)
    return phone[:3] + "*" * (len(phone) - 7) + phone[-4:]


def check_code(signature_b64: str) -> str:
    """A short code printed with the number: without the paper, nobody can look a prescription up."""
    return hashlib.sha256(signature_b64.encode("ascii")).hexdigest()[:16]


# -- rows ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prescription:
    id: int
    number: str
    visit_id: int
    doctor_id: int
    patient_id: int
    issued_at: float
    document_text: str
    signature: str
    key_id: str

    @classmethod
    def from_row(cls, row: sqlite3.Row | dict[str, Any]) -> Prescription:
        return cls(
            id=row["id"],
            number=row["number"],
            visit_id=row["visit_id"],
            doctor_id=row["doctor_id"],
            patient_id=row["patient_id"],
            issued_at=row["issued_at"],
            document_text=row["document"],
            signature=row["signature"],
            key_id=row["key_id"],
        )

    @property
    def document(self) -> dict[str, Any]:
        return json.loads(self.document_text)

    @property
    def items(self) -> list[dict[str, str]]:
        return self.document.get("items", [])

    @property
    def check_code(self) -> str:
        return check_code(self.signature)

    def signed_file(self) -> dict[str, Any]:
        return {"document": self.document, "signature": self.signature, "key_id": self.key_id}

    def signed_bytes(self) -> bytes:
        """The download: pretty for people, still verifiable (the signature covers the canonical form)."""
        return (json.dumps(self.signed_file(), ensure_ascii=False, indent=2) + "\n").encode("utf-8")


COLUMNS = "id, number, visit_id, doctor_id, patient_id, issued_at, document, signature, key_id"


async def list_for_visit(db: Database, visit_id: int) -> list[Prescription]:
    rows = await db.query(
        f"SELECT {COLUMNS} FROM prescriptions WHERE visit_id = ? ORDER BY id",  # noqa: S608
        [visit_id],
    )
    return [Prescription.from_row(r) for r in rows]


async def list_for_patient(db: Database, patient_id: int) -> list[Prescription]:
    rows = await db.query(
        f"SELECT {COLUMNS} FROM prescriptions WHERE patient_id = ? ORDER BY id DESC",  # noqa: S608
        [patient_id],
    )
    return [Prescription.from_row(r) for r in rows]


async def get_by_number(db: Database, number: str) -> Prescription | None:
    if not NUMBER_RE.match(number):
        return None
    row = await db.query_one(f"SELECT {COLUMNS} FROM prescriptions WHERE number = ?", [number])  # noqa: S608
    return Prescription.from_row(row) if row else None


async def find_checked(db: Database, number: str, code: str) -> Prescription | None:
    """The prescription printed with ``number`` and ``code`` (from the paper's QR), else None."""
    found = await get_by_number(db, number.strip().upper())
    if found is None or not hmac.compare_digest(found.check_code, code.strip().lower()):
        return None
    return found


# -- access -------------------------------------------------------------------------------------


def can_read(user: User | None, prescription: Prescription) -> bool:
    if user is None:
        return False
    return (
        user.role == "admin"
        or (user.role == "patient" and user.id == prescription.patient_id)
        or (user.role == "doctor" and user.id == prescription.doctor_id)
    )


def can_read_visit(user: User | None, visit: dict[str, Any]) -> bool:
    if user is None:
        return False
    return (
        user.role == "admin"
        or (user.role == "patient" and user.id == visit["patient_id"])
        or (user.role == "doctor" and user.id == visit["doctor_id"])
    )


def require_prescriber(user: User, visit: dict[str, Any]) -> None:
    """Only the visit's own doctor, and only for a visit that took place or is under way."""
    if not (user.role == "doctor" and user.id == visit["doctor_id"]):
        if can_read_visit(user, visit):
            raise Forbidden(_("Only the visit's doctor can issue a prescription."))
        raise NotFound(_("This visit does not exist."))
    if visit["status"] not in ISSUABLE_STATUSES:
        raise Conflict(
            _("A prescription can only be issued for a confirmed or completed visit."), code="visit_not_open"
        )


# -- issuing ------------------------------------------------------------------------------------


def _issued_at_text(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def issue_sync(
    db: sqlite_utils.Database,
    key: signing.HospitalKey,
    *,
    visit_id: int,
    doctor: User,
    items: list[dict[str, str]],
    hospital_name: str,
    tz: str,
    client_ref: str | None = None,
    remote: str | None = None,
    now: float | None = None,
) -> tuple[Prescription, bool]:
    """Inside the write transaction. Returns (prescription, created); a retried form returns the first."""
    if client_ref is not None:
        row = db.execute(
            f"SELECT {COLUMNS} FROM prescriptions WHERE visit_id = ? AND client_ref = ?",  # noqa: S608
            [visit_id, client_ref],
        ).fetchone()
        if row is not None:
            return Prescription.from_row(row), False
    visit = db.execute(
        "SELECT v.id, v.public_id, v.status, v.doctor_id, v.patient_id, p.display_name AS patient_name,"
        " p.phone AS patient_phone, d.display_name AS doctor_name"
        " FROM visits v JOIN users p ON p.id = v.patient_id JOIN users d ON d.id = v.doctor_id"
        " WHERE v.id = ?",
        [visit_id],
    ).fetchone()
    # Re-checked here: the visit may have been cancelled since the handler looked.
    if visit is None or visit["doctor_id"] != doctor.id:
        raise NotFound(_("This visit does not exist."))
    if visit["status"] not in ISSUABLE_STATUSES:
        raise Conflict(
            _("A prescription can only be issued for a confirmed or completed visit."), code="visit_not_open"
        )
    now = time.time() if now is None else now
    year = datetime.fromtimestamp(now, ZoneInfo(tz)).year
    counter = db.execute(
        "INSERT INTO prescription_counters (year, last) VALUES (?, 1)"
        " ON CONFLICT(year) DO UPDATE SET last = last + 1 RETURNING last",
        [year],
    ).fetchall()[0][0]
    number = f"RX-{year}-{counter:06d}"
    document = {
        "format": FORMAT,
        "number": number,
        "issued_at": _issued_at_text(now),
        "hospital": {"name": hospital_name},
        "doctor": {"id": doctor.id, "name": visit["doctor_name"]},
        "patient": {
            "id": visit["patient_id"],
            "name": visit["patient_name"],
            "phone": mask_phone(visit["patient_phone"]),
        },
        "visit": {"public_id": visit["public_id"]},
        "items": items,
    }
    signed = key.sign(document)
    text = signing.canonical(document).decode("utf-8")
    cur = db.execute(
        "INSERT INTO prescriptions (number, visit_id, doctor_id, patient_id, issued_at, document,"
        " signature, key_id, client_ref) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            number,
            visit_id,
            doctor.id,
            visit["patient_id"],
            now,
            text,
            signed["signature"],
            signed["key_id"],
            client_ref,
        ],
    )
    audit.record(
        db,
        "prescription.issue",
        "prescription",
        number,
        actor=doctor,
        remote=remote,
        subject_user_id=visit["patient_id"],
        detail={"visit": visit["public_id"], "items": len(items), "key_id": signed["key_id"]},
        created=now,
    )
    prescription = Prescription(
        id=int(cur.lastrowid),
        number=number,
        visit_id=visit_id,
        doctor_id=doctor.id,
        patient_id=visit["patient_id"],
        issued_at=now,
        document_text=text,
        signature=signed["signature"],
        key_id=signed["key_id"],
    )
    return prescription, True


async def issue(
    db: Database,
    key: signing.HospitalKey,
    *,
    visit: dict[str, Any],
    doctor: User,
    raw_items: Any,
    hospital_name: str,
    tz: str,
    client_ref: Any = None,
    remote: str | None = None,
) -> tuple[Prescription, bool]:
    require_prescriber(doctor, visit)
    items = validate_items(raw_items)
    if client_ref is not None and not (isinstance(client_ref, str) and CLIENT_REF_RE.match(client_ref)):
        raise BadRequest(
            _("The form sent a malformed submission id. Reload the page."), code="bad_client_ref"
        )
    return await db.execute_write_fn(
        lambda d: issue_sync(
            d,
            key,
            visit_id=visit["id"],
            doctor=doctor,
            items=items,
            hospital_name=hospital_name,
            tz=tz,
            client_ref=client_ref,
            remote=remote,
        )
    )


async def record_access(
    db: Database, prescription: Prescription, user: User, remote: str | None, action: str
) -> None:
    await db.execute_write_fn(
        lambda d: audit.record(
            d,
            action,
            "prescription",
            prescription.number,
            actor=user,
            remote=remote,
            subject_user_id=prescription.patient_id,
        )
    )
