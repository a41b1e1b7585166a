"""Nothing lost in a crash: a real server SIGKILLed at seeded random moments under load.

Booking, payments (the gateway's signed notices), late payments for holds that expired after
someone else took the slot, cancellations (refunds), uploads and call rooms run against
`python -m consult serve` while it is killed and restarted; after the final restart and one
sweep/drain, bench/chaos.py's `check` reads the database and the disk for the invariants listed
in its docstring (integrity, no double booking, everything acknowledged present, refunds exactly
once, confirmations in the outbox, no upload leftovers, past rooms closed, jobs settled).

The seed and the number of kills come from $CONSULT_CHAOS_SEED and $CONSULT_CHAOS_KILLS
(default 1 and 5); a failure prints the seed, the kill schedule and what each kill interrupted.
For a longer run: `python bench/chaos.py --kills 30`.
"""

from __future__ import annotations

import json
import os

from tests.chaos_helpers import chaos

SEED = int(os.environ.get("CONSULT_CHAOS_SEED", "1"))
KILLS = int(os.environ.get("CONSULT_CHAOS_KILLS", "5"))


def test_the_kill_schedule_is_a_function_of_the_seed():
    first = chaos.kill_schedule(SEED, 8, 1.5, 4.0)
    assert first == chaos.kill_schedule(SEED, 8, 1.5, 4.0)
    assert first != chaos.kill_schedule(SEED + 1, 8, 1.5, 4.0)
    assert len(first) == 8 and all(1.5 <= d <= 4.0 for d in first)


async def test_sigkill_under_load_loses_nothing(consult_server_factory):
    # Its own clinic, no demo data; --demo because the load pays through the payment simulator.
    server = await consult_server_factory(env=chaos.server_env(), demo=False, serve_args=["--demo"])
    opts = chaos.Options(seed=SEED, kills=KILLS, clients=3, doctors=2)
    result = await chaos.run(server, opts, say=print)
    summary = json.dumps(result.as_json(), indent=1)
    print(summary)
    context = f"seed {SEED}, schedule {result.schedule}\n" + "\n".join(result.log) + "\n" + summary
    assert result.kills == KILLS, context
    assert not result.violations, context
    # The checks had something to check: the load got through between the kills.
    acked, checked = result.acknowledged, result.checked
    assert acked["holds"] and acked["payments"] and acked["uploads"], context
    assert checked["refunds_due"] and checked["confirmed_visits"], context
