from __future__ import annotations

import time

import pytest

from consult.core.engine import open_database
from tests.booking_helpers import make_clinic
from tests.conftest import login


@pytest.mark.locale("en")  # asserts English texts
async def test_patient_home_lists_reports_receipts_and_prescriptions(client, settings, make_user):
    clinic = make_clinic(settings, make_user)
    patient = make_user("patient", "13900000077", name="Home Patient")
    other = make_user("patient", "13900000078", name="Other Patient")
    now = time.time()
    db = open_database(settings)

    def write(d) -> None:
        for pid, public_id, order in ((patient, "visit-home-1", "ORD-HOME-1"), (other, "visit-x", "ORD-X")):
            cur = d.execute(
                "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
                " status, fee_minor, currency, created, updated, call_nonce)"
                " VALUES (?,?,?,?,?,?, 'completed', 5000, 'CNY', ?, ?, 'n') RETURNING id",
                [
                    public_id,
                    pid,
                    clinic.doctor_ids[0],
                    clinic.department_id,
                    int(now - 86400) + pid,
                    int(now - 86400) + pid + 900,
                    now,
                    now,
                ],
            )
            vid = cur.fetchone()[0]
            d.execute(
                "INSERT INTO payments (visit_id, order_id, provider, amount_minor, currency, status, created)"
                " VALUES (?, ?, 'simulator', 5000, 'CNY', 'paid', ?)",
                [vid, order, now],
            )
            d.execute(
                "INSERT INTO reports (visit_id, owner_id, display_name, stored_name, content_type, size,"
                " sha256, created) VALUES (?, ?, 'r.pdf', ?, 'application/pdf', 10, 'x', ?)",
                [vid, pid, f"stored-{pid}", now],
            )
            d.execute(
                "INSERT INTO prescriptions (number, visit_id, doctor_id, patient_id, issued_at, document,"
                " signature, key_id) VALUES (?, ?, ?, ?, ?, '{}', 'sig', 'k')",
                [f"RX-2026-00000{pid}", vid, clinic.doctor_ids[0], pid, now],
            )

    db.write_sync(write)
    db.close()
    await login(client, "13900000077")
    text = await (await client.get("/patient")).text()
    assert "/pay/ORD-HOME-1/receipt" in text
    assert f"RX-2026-00000{patient}" in text
    assert "1 reports" in text
    # Nothing of the other patient's visit shows.
    assert "ORD-X" not in text and f"RX-2026-00000{other}" not in text
