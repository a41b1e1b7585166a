"""Prescriptions: a Chinese outpatient prescription (门诊处方), validated, previewed, numbered,
signed with the hospital key, optionally reviewed by a pharmacist; and who may read it.

The doctor's form is checked here (``validate``) into a *content*: the patient's sex and age,
the clinical diagnosis, the allergy history and up to five medicine lines, each with strength,
dose and unit, route, frequency, days and total quantity. The preview shows that content and
carries the hash of the whole previewed document (``preview_hash``: the form's content and what the
server adds, patient and doctor names, department, hospital); signing rebuilds that document in
its write transaction and refuses it if the hash differs from the one the doctor saw, so neither
a form changed after its preview nor a renamed patient is ever signed unseen.

The number is allocated, the document built and signed, and the row and its audit entry written
in one write transaction, so numbers are unique, increase in issue order and are never skipped
by a failed write. The stored ``document`` text is the exact canonical JSON that was signed.
Documents of format 1 (before the outpatient fields) are still shown and verified as they are.
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
from consult.core.i18n import _, pgettext

FORMAT = "consult-prescription/2"
ISSUABLE_STATUSES = ("confirmed", "completed")
MAX_ITEMS = 5  # 处方管理办法: at most five medicines on one prescription
NUMBER_RE = re.compile(r"^RX-\d{4}-\d{6,}$")
CLIENT_REF_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
DOSE_RE = re.compile(r"^(\d{1,5})(?:\.(\d{1,3}))?$")
MAX_DOSE = 10000
MAX_DAYS = 90
MAX_QUANTITY = 9999
MAX_AGE = 150
MAX_REASON = 500

# Row states: issued (the patient sees it), pending (waiting for a pharmacist), returned (refused
# by a pharmacist with a reason; the doctor writes a new one).
ISSUED, PENDING, RETURNED = "issued", "pending", "returned"

SEXES = ("male", "female")
ROUTES = (
    "oral",
    "topical",
    "inhaled",
    "sublingual",
    "eye",
    "ear",
    "nasal",
    "rectal",
    "subcutaneous",
    "intramuscular",
    "intravenous",
)
FREQUENCIES = ("qd", "bid", "tid", "qid", "q8h", "q12h", "qn", "prn", "qw", "st")


def sex_label(code: str) -> str:
    return {"male": pgettext("sex", "Male"), "female": pgettext("sex", "Female")}.get(code, code)


def route_label(code: str) -> str:
    return {
        "oral": _("Oral"),
        "topical": _("Topical (external use)"),
        "inhaled": _("Inhaled"),
        "sublingual": _("Under the tongue"),
        "eye": _("Eye drops"),
        "ear": _("Ear drops"),
        "nasal": _("Nasal"),
        "rectal": _("Rectal"),
        "subcutaneous": _("Subcutaneous injection"),
        "intramuscular": _("Intramuscular injection"),
        "intravenous": _("Intravenous injection"),
    }.get(code, code)


def frequency_label(code: str) -> str:
    return {
        "qd": _("Once a day"),
        "bid": _("Twice a day"),
        "tid": _("Three times a day"),
        "qid": _("Four times a day"),
        "q8h": _("Every 8 hours"),
        "q12h": _("Every 12 hours"),
        "qn": _("Every night"),
        "prn": _("When needed"),
        "qw": _("Once a week"),
        "st": _("At once"),
    }.get(code, code)


def labels() -> dict[str, dict[str, str]]:
    """Code -> words in the current language: for the form's choices and for showing a document."""
    return {
        "sex": {c: sex_label(c) for c in SEXES},
        "route": {c: route_label(c) for c in ROUTES},
        "frequency": {c: frequency_label(c) for c in FREQUENCIES},
    }


@dataclass(frozen=True)
class Field:
    name: str
    max_len: int
    required: bool


ITEM_TEXT = (
    Field("drug", 100, True),
    Field("strength", 50, True),
    Field("dose_unit", 10, True),
    Field("quantity_unit", 10, True),
    Field("instructions", 200, False),
)
ITEM_FIELDS = (
    "drug",
    "strength",
    "dose",
    "dose_unit",
    "route",
    "frequency",
    "days",
    "quantity",
    "quantity_unit",
    "instructions",
)


def _field_label(name: str) -> str:
    return {
        "drug": _("drug name"),
        "strength": _("strength (specification)"),
        "dose_unit": _("dose unit"),
        "quantity_unit": _("quantity unit"),
        "instructions": _("instructions"),
        "diagnosis": _("clinical diagnosis"),
        "allergies": _("allergy history"),
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


def _whole(value: Any, low: int, high: int) -> int | None:
    """A whole number in [low, high] from a JSON number or digits, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        if len(value.strip()) > 6:
            return None
        number = int(value.strip())
    else:
        return None
    return number if low <= number <= high else None


def _dose(value: Any) -> str | None:
    """A dose as canonical decimal text ("0.5", "250"): documents hold no floats."""
    text = _clean(value)
    if not text:
        return None
    m = DOSE_RE.match(text)
    if not m:
        return None
    whole, frac = m.group(1), (m.group(2) or "").rstrip("0")
    whole = str(int(whole))
    if (whole == "0" and not frac) or int(whole) > MAX_DOSE or (int(whole) == MAX_DOSE and frac):
        return None
    return f"{whole}.{frac}" if frac else whole


def _text(value: Any, f: Field, problems: list[tuple[str, str]]) -> str:
    cleaned = _clean(value)
    if cleaned is None:
        problems.append((f.name, _("the %(field)s must be text.")))
    elif f.required and not cleaned:
        problems.append((f.name, _("enter the %(field)s.")))
    elif len(cleaned) > f.max_len:
        problems.append((f.name, _("the %(field)s is too long (at most %(max)d characters).")))
    elif CONTROL_RE.search(cleaned) or (f.name != "instructions" and "\n" in cleaned):
        problems.append((f.name, _("the %(field)s contains characters that cannot be printed.")))
    else:
        return cleaned
    return ""


def _validate_item(entry: dict[str, Any], index: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    problems: list[tuple[str, str]] = []
    item: dict[str, Any] = {}
    for f in ITEM_TEXT:
        item[f.name] = _text(entry.get(f.name), f, problems)
    dose = _dose(entry.get("dose"))
    if dose is None:
        problems.append(("dose", _("the dose must be a number greater than 0 and at most %(most)d.")))
    item["dose"] = dose or ""
    route = entry.get("route")
    if route not in ROUTES:
        problems.append(("route", _("choose the route (how it is taken).")))
    item["route"] = route if route in ROUTES else ""
    frequency = entry.get("frequency")
    if frequency not in FREQUENCIES:
        problems.append(("frequency", _("choose how often it is taken.")))
    item["frequency"] = frequency if frequency in FREQUENCIES else ""
    days = _whole(entry.get("days"), 1, MAX_DAYS)
    if days is None:
        problems.append(("days", _("the days must be a whole number from 1 to %(days)d.")))
    item["days"] = days or 0
    quantity = _whole(entry.get("quantity"), 1, MAX_QUANTITY)
    if quantity is None:
        problems.append(("quantity", _("the total quantity must be a whole number from 1 to %(qty)d.")))
    item["quantity"] = quantity or 0
    lengths = {f.name: f.max_len for f in ITEM_TEXT}
    errors = [
        {
            "item": index,
            "field": name,
            "message": _("Medicine %(n)d: %(problem)s")
            % {
                "n": index + 1,
                "problem": problem
                % {
                    "field": _field_label(name) if name in lengths else "",
                    "max": lengths.get(name, 0),
                    "most": MAX_DOSE,
                    "days": MAX_DAYS,
                    "qty": MAX_QUANTITY,
                },
            },
        }
        for name, problem in problems
    ]
    return {k: item[k] for k in ITEM_FIELDS}, errors


def validate_items(raw: Any) -> list[dict[str, Any]]:
    """Return the cleaned medicine lines or raise ``InvalidPrescription`` naming every problem."""
    items, errors = _items(raw)
    if errors:
        raise InvalidPrescription(errors[0]["message"], errors)
    return items


def _items(raw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not isinstance(raw, list) or not raw:
        msg = _("Add at least one medicine.")
        return [], [{"item": None, "field": None, "message": msg}]
    if len(raw) > MAX_ITEMS:
        msg = _("A prescription can hold at most %(n)d medicines.") % {"n": MAX_ITEMS}
        return [], [{"item": None, "field": None, "message": msg}]
    items: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            msg = _("Medicine %(n)d is malformed.") % {"n": index + 1}
            errors.append({"item": index, "field": None, "message": msg})
            continue
        item, problems = _validate_item(entry, index)
        items.append(item)
        errors.extend(problems)
    return items, errors


def validate(body: Any) -> dict[str, Any]:
    """The form's content, cleaned: {sex, age, diagnosis, allergies, items}; or InvalidPrescription."""
    if not isinstance(body, dict):
        raise BadRequest(_("Send the prescription as a JSON object."), code="bad_json")
    errors: list[dict[str, Any]] = []
    content: dict[str, Any] = {}
    sex = body.get("sex")
    if sex not in SEXES:
        errors.append({"item": None, "field": "sex", "message": _("Choose the patient's sex.")})
    content["sex"] = sex if sex in SEXES else ""
    age = _whole(body.get("age"), 0, MAX_AGE)
    if age is None:
        msg = _("Enter the patient's age in whole years, from 0 to %(most)d.") % {"most": MAX_AGE}
        errors.append({"item": None, "field": "age", "message": msg})
    content["age"] = age if age is not None else 0
    for name, max_len, missing in (
        ("diagnosis", 200, _("Enter the clinical diagnosis: a prescription cannot be issued without it.")),
        ("allergies", 200, _("Enter the allergy history (write “None” if the patient has no allergies).")),
    ):
        problems: list[tuple[str, str]] = []
        value = _text(body.get(name), Field(name, max_len, True), problems)
        for _name, problem in problems:
            if _clean(body.get(name)) == "":
                message = missing
            else:
                message = (problem % {"field": _field_label(name), "max": max_len}).capitalize()
            errors.append({"item": None, "field": name, "message": message})
        content[name] = value
    items, item_errors = _items(body.get("items"))
    errors.extend(item_errors)
    content["items"] = items
    if errors:
        raise InvalidPrescription(errors[0]["message"], errors)
    return content


def preview_hash(document: dict[str, Any]) -> str:
    """What the preview showed, as a hash: the document without the number and time signing adds."""
    shown = {**document, "number": "", "issued_at": ""}
    return hashlib.sha256(signing.canonical(shown)).hexdigest()


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
    status: str = ISSUED
    reviewed_by: int | None = None
    reviewed_at: float | None = None
    review_note: str = ""

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
            status=row["status"],
            reviewed_by=row["reviewed_by"],
            reviewed_at=row["reviewed_at"],
            review_note=row["review_note"] or "",
        )

    @property
    def document(self) -> dict[str, Any]:
        return json.loads(self.document_text)

    @property
    def items(self) -> list[dict[str, Any]]:
        return self.document.get("items", [])

    @property
    def check_code(self) -> str:
        return check_code(self.signature)

    def signed_file(self) -> dict[str, Any]:
        return {"document": self.document, "signature": self.signature, "key_id": self.key_id}

    def signed_bytes(self) -> bytes:
        """The download: pretty for people, still verifiable (the signature covers the canonical form)."""
        return (json.dumps(self.signed_file(), ensure_ascii=False, indent=2) + "\n").encode("utf-8")


COLUMNS = (
    "id, number, visit_id, doctor_id, patient_id, issued_at, document, signature, key_id,"
    " status, reviewed_by, reviewed_at, review_note"
)


def visible_to_patient(p: Prescription) -> bool:
    return p.status == ISSUED


async def list_for_visit(db: Database, visit_id: int, *, issued_only: bool = False) -> list[Prescription]:
    where = " AND status = 'issued'" if issued_only else ""
    rows = await db.query(
        f"SELECT {COLUMNS} FROM prescriptions WHERE visit_id = ?{where} ORDER BY id",  # noqa: S608
        [visit_id],
    )
    return [Prescription.from_row(r) for r in rows]


async def list_for_patient(db: Database, patient_id: int) -> list[Prescription]:
    """What the patient may see: issued (or approved) prescriptions only."""
    rows = await db.query(
        f"SELECT {COLUMNS} FROM prescriptions WHERE patient_id = ? AND status = 'issued'"  # noqa: S608
        " ORDER BY id DESC",
        [patient_id],
    )
    return [Prescription.from_row(r) for r in rows]


async def pending_review(db: Database, limit: int = 200) -> list[Prescription]:
    """The pharmacist's queue, oldest first."""
    rows = await db.query(
        f"SELECT {COLUMNS} FROM prescriptions WHERE status = 'pending' ORDER BY id LIMIT ?",  # noqa: S608
        [limit],
    )
    return [Prescription.from_row(r) for r in rows]


async def recently_reviewed(db: Database, limit: int = 20) -> list[Prescription]:
    rows = await db.query(
        f"SELECT {COLUMNS} FROM prescriptions WHERE reviewed_at IS NOT NULL"  # noqa: S608
        " ORDER BY reviewed_at DESC LIMIT ?",
        [limit],
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
    """Patients see theirs once issued; pharmacists every one (they dispense and review)."""
    if user is None:
        return False
    return (
        user.role in ("admin", "pharmacist")
        or (
            user.role == "patient" and user.id == prescription.patient_id and visible_to_patient(prescription)
        )
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


def _visit_facts(db: sqlite_utils.Database, visit_id: int) -> sqlite3.Row | None:
    return db.execute(
        "SELECT v.id, v.public_id, v.status, v.doctor_id, v.patient_id, p.display_name AS patient_name,"
        " p.phone AS patient_phone, d.display_name AS doctor_name,"
        " dep.name_zh AS department_zh, dep.name_en AS department_en"
        " FROM visits v JOIN users p ON p.id = v.patient_id JOIN users d ON d.id = v.doctor_id"
        " LEFT JOIN departments dep ON dep.id = v.department_id"
        " WHERE v.id = ?",
        [visit_id],
    ).fetchone()


def build_document(
    visit: sqlite3.Row | dict[str, Any],
    content: dict[str, Any],
    *,
    doctor_id: int,
    hospital_name: str,
    locale: str,
    number: str,
    issued_at: str,
) -> dict[str, Any]:
    """The document that is signed (and, with a placeholder number, what the preview shows)."""
    department = visit["department_zh"] if locale.startswith("zh") else visit["department_en"]
    return {
        "format": FORMAT,
        "number": number,
        "issued_at": issued_at,
        "hospital": {"name": hospital_name},
        "department": {"name": department or ""},
        "doctor": {"id": doctor_id, "name": visit["doctor_name"]},
        "patient": {
            "id": visit["patient_id"],
            "name": visit["patient_name"],
            "phone": mask_phone(visit["patient_phone"]),
            "sex": content["sex"],
            "age": content["age"],
        },
        "diagnosis": content["diagnosis"],
        "allergies": content["allergies"],
        "visit": {"public_id": visit["public_id"]},
        "items": content["items"],
    }


async def preview_document(
    db: Database,
    *,
    visit: dict[str, Any],
    doctor: User,
    content: dict[str, Any],
    hospital_name: str,
    locale: str,
) -> dict[str, Any]:
    row = await db.execute_fn(lambda d: _visit_facts(d, visit["id"]))
    if row is None:
        raise NotFound(_("This visit does not exist."))
    return build_document(
        row, content, doctor_id=doctor.id, hospital_name=hospital_name, locale=locale, number="", issued_at=""
    )


def issue_sync(
    db: sqlite_utils.Database,
    key: signing.HospitalKey,
    *,
    visit_id: int,
    doctor: User,
    content: dict[str, Any],
    hospital_name: str,
    tz: str,
    locale: str = "zh_CN",
    review: bool = False,
    seen_hash: str | None = None,
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
    visit = _visit_facts(db, visit_id)
    # Re-checked here: the visit may have been cancelled since the handler looked.
    if visit is None or visit["doctor_id"] != doctor.id:
        raise NotFound(_("This visit does not exist."))
    if visit["status"] not in ISSUABLE_STATUSES:
        raise Conflict(
            _("A prescription can only be issued for a confirmed or completed visit."), code="visit_not_open"
        )
    if seen_hash is not None:
        shown = build_document(
            visit,
            content,
            doctor_id=doctor.id,
            hospital_name=hospital_name,
            locale=locale,
            number="",
            issued_at="",
        )
        if not hmac.compare_digest(seen_hash, preview_hash(shown)):
            raise Conflict(
                _("The prescription was changed after its preview. Preview it again, then sign."),
                code="preview_stale",
            )
    now = time.time() if now is None else now
    year = datetime.fromtimestamp(now, ZoneInfo(tz)).year
    counter = db.execute(
        "INSERT INTO prescription_counters (year, last) VALUES (?, 1)"
        " ON CONFLICT(year) DO UPDATE SET last = prescription_counters.last + 1 RETURNING last",
        [year],
    ).fetchall()[0][0]
    number = f"RX-{year}-{counter:06d}"
    document = build_document(
        visit,
        content,
        doctor_id=doctor.id,
        hospital_name=hospital_name,
        locale=locale,
        number=number,
        issued_at=_issued_at_text(now),
    )
    signed = key.sign(document)
    text = signing.canonical(document).decode("utf-8")
    status = PENDING if review else ISSUED
    cur = db.execute(
        "INSERT INTO prescriptions (number, visit_id, doctor_id, patient_id, issued_at, document,"
        " signature, key_id, client_ref, status, diagnosis) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " RETURNING id",
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
            status,
            content["diagnosis"],
        ],
    )
    prescription_id = int(cur.fetchone()[0])
    audit.record(
        db,
        "prescription.issue",
        "prescription",
        number,
        actor=doctor,
        remote=remote,
        subject_user_id=visit["patient_id"],
        detail={
            "visit": visit["public_id"],
            "items": len(content["items"]),
            "key_id": signed["key_id"],
            "status": status,
        },
        created=now,
    )
    prescription = Prescription(
        id=prescription_id,
        number=number,
        visit_id=visit_id,
        doctor_id=doctor.id,
        patient_id=visit["patient_id"],
        issued_at=now,
        document_text=text,
        signature=signed["signature"],
        key_id=signed["key_id"],
        status=status,
    )
    return prescription, True


async def issue(
    db: Database,
    key: signing.HospitalKey,
    *,
    visit: dict[str, Any],
    doctor: User,
    body: Any,
    hospital_name: str,
    tz: str,
    locale: str = "zh_CN",
    review: bool = False,
    remote: str | None = None,
) -> tuple[Prescription, bool]:
    """Sign what the preview showed: ``body`` is the form plus the preview's ``preview_hash``."""
    require_prescriber(doctor, visit)
    content = validate(body)
    client_ref = body.get("client_ref")
    if client_ref is not None and not (isinstance(client_ref, str) and CLIENT_REF_RE.match(client_ref)):
        raise BadRequest(
            _("The form sent a malformed submission id. Reload the page."), code="bad_client_ref"
        )
    seen = body.get("preview_hash")
    if not isinstance(seen, str) or not HASH_RE.match(seen):
        raise BadRequest(_("Preview the prescription before signing it."), code="preview_required")
    return await db.execute_write_fn(
        lambda d: issue_sync(
            d,
            key,
            visit_id=visit["id"],
            doctor=doctor,
            content=content,
            hospital_name=hospital_name,
            tz=tz,
            locale=locale,
            review=review,
            seen_hash=seen,
            client_ref=client_ref,
            remote=remote,
        )
    )


# -- pharmacist review --------------------------------------------------------------------------


def review_sync(
    db: sqlite_utils.Database,
    *,
    number: str,
    pharmacist: User,
    approve: bool,
    reason: str,
    remote: str | None,
    now: float | None = None,
) -> Prescription:
    row = db.execute(f"SELECT {COLUMNS} FROM prescriptions WHERE number = ?", [number]).fetchone()  # noqa: S608
    if row is None:
        raise NotFound(_("This prescription does not exist."))
    if row["status"] != PENDING:
        raise Conflict(_("This prescription has already been reviewed."), code="already_reviewed")
    now = time.time() if now is None else now
    status = ISSUED if approve else RETURNED
    db.execute(
        "UPDATE prescriptions SET status = ?, reviewed_by = ?, reviewed_at = ?, review_note = ? WHERE id = ?",
        [status, pharmacist.id, now, reason, row["id"]],
    )
    audit.record(
        db,
        "prescription.approve" if approve else "prescription.return",
        "prescription",
        number,
        actor=pharmacist,
        remote=remote,
        subject_user_id=row["patient_id"],
        detail={"reason": reason} if reason else {},
        created=now,
    )
    updated = db.execute(f"SELECT {COLUMNS} FROM prescriptions WHERE id = ?", [row["id"]]).fetchone()  # noqa: S608
    return Prescription.from_row(updated)


async def review(
    db: Database, *, number: str, pharmacist: User, approve: bool, reason: Any, remote: str | None
) -> Prescription:
    if pharmacist.role != "pharmacist":
        raise Forbidden(_("Only a pharmacist can review prescriptions."))
    text = _clean(reason)
    if text is None:
        text = ""
    if not approve and not text:
        raise BadRequest(_("Say why the prescription is returned to the doctor."), code="reason_required")
    if len(text) > MAX_REASON or CONTROL_RE.search(text):
        raise BadRequest(
            _("The reason is too long (at most %(max)d characters).") % {"max": MAX_REASON},
            code="reason_too_long",
        )
    if not NUMBER_RE.match(number):
        raise NotFound(_("This prescription does not exist."))
    return await db.execute_write_fn(
        lambda d: review_sync(
            d, number=number, pharmacist=pharmacist, approve=approve, reason=text, remote=remote
        )
    )


async def record_queue_view(db: Database, user: User, remote: str | None, shown: list[str]) -> None:
    """The review queue shows patients' prescriptions: one audit entry per look, naming them."""
    await db.execute_write_fn(
        lambda d: audit.record(
            d,
            "prescription.review_queue",
            "prescription",
            None,
            actor=user,
            remote=remote,
            detail={"numbers": shown[:50], "count": len(shown)},
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
