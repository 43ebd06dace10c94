"""The admission ledger against a real redis-server: each script's contract, and that no kill of an actor, at
any point of its admission bookkeeping, leaks a slot or mints one (``produced == written + held`` always;
after recovery ``produced == written`` and ``held == 0``)."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from buffer import ControlPlane, GroupReader, GroupWriter, admission_capacity
from buffer.admission import ADMIT_LUA, DELIVER_LUA
from buffer.synthetic import synthetic_group
from configs.schema import RedisConfig
from helpers import LEDGER_ACTOR, sigkill, spawn_python
from protocol import Control, encode

ACTOR = "actor-0"


def make_cfg(url: str) -> RedisConfig:
    return RedisConfig(url=url, connect_timeout_s=5.0, pending_timeout_s=0.5, read_block_ms=100,
                       retry_backoff_s=0.05, retry_backoff_max_s=0.2, max_outage_s=20.0)


def payload(i: int, version: int = 0) -> bytes:
    rng = np.random.default_rng(i)
    return encode(synthetic_group(rng, f"g{i}", n_traj=2, n_tokens=16, version=version, actor_id=ACTOR))


class Ledger:
    """A ControlPlane plus direct access to the deliver script (what GroupWriter runs per entry) and the raw
    counts, for checking the invariant."""

    def __init__(self, url: str, capacity_control: Control | None = None):
        self.cfg = make_cfg(url)
        self.plane = ControlPlane(self.cfg)
        self.plane.reset()
        self.client = self.plane.client
        self.keys = self.plane.keys
        self._deliver = self.client.register_script(DELIVER_LUA)
        if capacity_control is not None:
            self.plane.write_control(capacity_control)

    def deliver(self, data: bytes, slot: str) -> str:
        """One DELIVER_LUA call: what the writer does for an entry (and again for it on a retry)."""
        keys = [self.keys.traj, self.keys.held, self.keys.produced, self.keys.delivered]
        return self._deliver(keys=keys, args=[data, slot]).decode()

    @property
    def produced(self) -> int:
        return self.plane.counters()["produced"]

    @property
    def written(self) -> int:
        return self.client.xlen(self.keys.traj)

    def assert_invariant(self) -> None:
        produced, written, held = self.produced, self.written, self.plane.held()
        assert produced == written + held, f"produced {produced} != written {written} + held {held}"

    def admit_all(self, actor_id: str = "probe") -> list[str]:
        """Admit until refused: the capacity left (the slots stay held)."""
        out = []
        while (slot := self.plane.admit(actor_id)) is not None:
            out.append(slot)
            assert len(out) <= 10_000
        return out

    def close(self) -> None:
        self.plane.reset()
        self.plane.close()


@pytest.fixture
def ledger(redis_url):
    led = Ledger(redis_url, Control(version=0, max_staleness=1, batch_groups=2))  # capacity 4
    yield led
    led.close()


# -- each script's contract ---------------------------------------------------------------------------------


def test_admit_before_control_returns_none(redis_url):
    led = Ledger(redis_url)
    try:
        assert led.plane.admit(ACTOR) is None
        assert led.produced == 0 and led.plane.held() == 0
    finally:
        led.close()


def test_admit_under_capacity_holds_a_token_of_the_actor_and_at_capacity_returns_none(ledger):
    slots = [ledger.plane.admit(ACTOR) for _ in range(4)]
    assert all(s is not None and s.startswith(f"{ACTOR}:") and len(s) == len(ACTOR) + 17 for s in slots)
    assert len(set(slots)) == 4
    assert ledger.plane.admit(ACTOR) is None and ledger.plane.admit("actor-1") is None
    assert ledger.produced == 4 == ledger.plane.held(ACTOR) and ledger.plane.held("actor-1") == 0
    assert {k.decode(): v.decode() for k, v in ledger.client.hgetall(ledger.keys.held).items()} == \
        {s: ACTOR for s in slots}


def test_admit_retried_with_the_same_token_counts_once(ledger):
    admit = ledger.client.register_script(ADMIT_LUA)
    keys = [ledger.keys.control, ledger.keys.produced, ledger.keys.held]
    for _ in range(3):  # the reply was lost and the call retried
        assert admit(keys=keys, args=[f"{ACTOR}:00", ACTOR])[0] == 1
    assert ledger.produced == 1 == ledger.plane.held()


def test_cancel_twice_gives_back_once(ledger):
    a, b = ledger.plane.admit(ACTOR), ledger.plane.admit(ACTOR)
    assert ledger.plane.cancel(a) is True
    assert ledger.plane.cancel(a) is False
    assert ledger.plane.cancel(f"{ACTOR}:{'0' * 16}") is False  # unknown: mints nothing
    assert ledger.produced == 1 and ledger.plane.held() == 1 and b
    assert len(ledger.admit_all()) == 3


def test_cancel_after_delivery_gives_back_nothing(ledger):
    slot = ledger.plane.admit(ACTOR)
    ledger.deliver(payload(0), slot)
    assert ledger.plane.cancel(slot) is False
    assert ledger.produced == 1 == ledger.written and ledger.plane.held() == 0


def test_give_back_returns_the_held_slots_of_a_restarted_actor_only(ledger):
    mine = [ledger.plane.admit("actor-1") for _ in range(3)]
    other = ledger.plane.admit("actor-10")  # an id that starts with the other's: not confused with it
    ledger.deliver(payload(0), mine[0])
    assert ledger.plane.give_back("actor-1") == 2
    assert ledger.plane.give_back("actor-1") == 0
    assert ledger.plane.held("actor-1") == 0 and ledger.plane.held("actor-10") == 1 and other
    assert ledger.produced == 2  # the delivered entry and actor-10's slot
    ledger.assert_invariant()
    assert ledger.plane.cancel(mine[1]) is False  # given back already: its late cancel mints nothing


def test_reclaim_expired_gives_back_a_lapsed_lease_while_a_live_lease_keeps_its_slots(ledger):
    ledger.plane.keep_lease("live", 30.0)
    ledger.plane.keep_lease("lapsed", 0.05)
    live = [ledger.plane.admit("live") for _ in range(2)]
    lapsed = [ledger.plane.admit("lapsed") for _ in range(2)]
    assert all(live + lapsed)
    ledger.deliver(payload(0), lapsed[0])
    time.sleep(0.2)
    assert not ledger.client.exists(ledger.keys.lease("lapsed"))
    assert ledger.plane.reclaim_expired() == [("lapsed", 1)]
    assert ledger.plane.reclaim_expired() == []
    assert ledger.plane.held("live") == 2 and ledger.plane.held() == 2
    assert ledger.produced == 3
    ledger.assert_invariant()


def test_deliver_of_a_reclaimed_slot_counts_it_again(ledger):
    slot = ledger.plane.admit("lapsed")  # no lease at all: reclaimable at once
    assert ledger.plane.reclaim_expired() == [("lapsed", 1)] and ledger.produced == 0
    writer = GroupWriter(ledger.cfg, "lapsed")  # the group was queued in the writer meanwhile
    writer.send(synthetic_group(np.random.default_rng(0), "late", n_traj=2, n_tokens=16), slot)
    assert writer.close() == 0
    assert ledger.produced == 1 == ledger.written and ledger.plane.held() == 0
    [(_, fields)] = ledger.client.xrange(ledger.keys.traj)
    assert fields[b"slot"].decode() == slot


def test_deliver_written_twice_by_a_retry_counts_each_entry(ledger):
    slot = ledger.plane.admit(ACTOR)
    first, second = ledger.deliver(payload(0), slot), ledger.deliver(payload(0), slot)
    assert first != second
    assert ledger.produced == 2 == ledger.written and ledger.plane.held() == 0


def test_writer_send_without_slot_is_a_plain_xadd(ledger):
    writer = GroupWriter(ledger.cfg, ACTOR)
    writer.send(synthetic_group(np.random.default_rng(0), "g", n_traj=2, n_tokens=16))
    assert writer.close() == 0
    [(_, fields)] = ledger.client.xrange(ledger.keys.traj)
    assert set(fields) == {b"data"}
    assert ledger.produced == 0 and not ledger.client.exists(ledger.keys.delivered)


# -- garbage cannot move capacity ------------------------------------------------------------------------------


def test_dead_letter_of_garbage_leaves_produced_unchanged(ledger):
    held = ledger.plane.admit(ACTOR)
    delivered = ledger.plane.admit(ACTOR)
    ledger.deliver(payload(0, version=5), delivered)  # valid bytes, but from the future: kept out of the way below
    rng = random.Random(0)
    garbage = [
        {"data": rng.randbytes(64)},                                       # no slot
        {"data": rng.randbytes(64), "slot": f"{ACTOR}:{'ab' * 8}"},        # forged slot
        {"data": rng.randbytes(64), "slot": held},                         # copied from a held slot
        {"data": rng.randbytes(64), "slot": delivered},                    # copied from a delivered entry
        {"slot": delivered},                                               # no data at all
    ]
    for fields in garbage:
        ledger.client.xadd(ledger.keys.traj, fields)
    reader = GroupReader(ledger.cfg, "learner-0")
    got = []
    for _ in range(5):
        got += reader.receive(8, block_ms=50)  # no current_version: the future entry is valid here
    assert [e.group.group_id for e in got] == ["g0"]
    assert reader.dead == len(garbage)
    assert ledger.produced == 2 and ledger.plane.held() == 1
    assert ledger.client.hlen(ledger.keys.delivered) == 1  # only the admitted entry, still pending
    reader.ack([e.id for e in got])
    assert ledger.produced == 2 and not ledger.client.exists(ledger.keys.delivered)


def test_dead_letter_of_an_admitted_invalid_entry_gives_its_slot_back_exactly_once(ledger):
    bad_bytes = ledger.plane.admit(ACTOR)
    future = ledger.plane.admit(ACTOR)
    ids = [ledger.deliver(random.Random(1).randbytes(64), bad_bytes), ledger.deliver(payload(0, version=5), future)]
    assert ledger.produced == 2 and ledger.plane.held() == 0
    reader = GroupReader(ledger.cfg, "learner-0")
    assert reader.receive(8, block_ms=50, current_version=0) == []
    assert reader.dead == 2 and ledger.produced == 0
    for sid in ids:  # dead-lettered again (a second consumer racing the first): nothing more comes back
        reader._send_to_dead(sid, "again", b"")
    assert ledger.produced == 0 and ledger.plane.counters()["dead"] == 2
    assert not ledger.client.exists(ledger.keys.delivered)
    assert len(ledger.admit_all()) == 4


def test_dead_letter_of_a_duplicated_admitted_entry_gives_back_each_copy_once(ledger):
    slot = ledger.plane.admit(ACTOR)
    for _ in range(2):  # written twice by an at-least-once retry, counted twice
        ledger.deliver(payload(0, version=5), slot)
    assert ledger.produced == 2
    reader = GroupReader(ledger.cfg, "learner-0")
    assert reader.receive(8, block_ms=50, current_version=0) == []
    assert reader.dead == 2 and ledger.produced == 0


def test_ack_removes_entries_from_delivered_and_keeps_their_slots_counted(ledger):
    for i in range(4):
        ledger.deliver(payload(i), ledger.plane.admit(ACTOR))
    assert ledger.client.hlen(ledger.keys.delivered) == 4
    reader = GroupReader(ledger.cfg, "learner-0")
    got = reader.receive(8, block_ms=50)
    assert len(got) == 4
    assert reader.ack([e.id for e in got[:3]]) == 3
    assert ledger.client.hlen(ledger.keys.delivered) == 1
    assert reader.ack([e.id for e in got]) == 1
    assert not ledger.client.exists(ledger.keys.delivered)  # no growth with the entries acked
    assert ledger.produced == 4 and ledger.plane.counters()["consumed"] == 4  # trained on: not given back
    assert ledger.admit_all() == []


# -- a kill at every point of an actor's life --------------------------------------------------------------------

# A scripted actor life: (operation, group name). "deliver" is GroupWriter.send + flush; "redeliver" a retry
# writing the same entry again; "cancel" an admitted group that never reaches the writer. Capacity 4, so one
# admit is refused (its group is then skipped) and one delivery is of a slot given back by a cancel.
LIFE = [
    ("admit", "a"), ("admit", "b"), ("admit", "c"), ("deliver", "a"), ("cancel", "b"), ("admit", "d"),
    ("admit", "e"), ("cancel", "a"), ("deliver", "c"), ("redeliver", "c"), ("admit", "f"), ("cancel", "d"),
    ("cancel", "d"), ("deliver", "b"), ("admit", "g"), ("deliver", "e"), ("deliver", "g"),
]


def run_life(led: Ledger, writer: GroupWriter, steps: list[tuple[str, str]]) -> None:
    slots: dict[str, str | None] = {}
    rng = np.random.default_rng(0)
    for op, name in steps:
        if op == "admit":
            slots[name] = led.plane.admit(ACTOR)
            continue
        slot = slots.get(name)
        if slot is None:
            continue  # refused at admission: nothing to do for this group
        if op == "deliver":
            writer.send(synthetic_group(rng, name, n_traj=2, n_tokens=16, actor_id=ACTOR), slot)
            assert writer.flush(10.0) == 0
        elif op == "redeliver":
            led.deliver(payload(0), slot)
        elif op == "cancel":
            led.plane.cancel(slot)
        led.assert_invariant()


@pytest.mark.parametrize("recovery", ["restart", "lease_lapse"])
def test_a_kill_between_any_two_steps_leaks_no_slot_and_mints_none(redis_url, recovery):
    capacity = admission_capacity(0, 1, 2)
    led = Ledger(redis_url)
    writer = GroupWriter(led.cfg, ACTOR)
    try:
        for cut in range(len(LIFE) + 1):
            led.plane.reset()
            led.plane.write_control(Control(version=0, max_staleness=1, batch_groups=2))
            led.plane.keep_lease(ACTOR, 30.0)
            run_life(led, writer, LIFE[:cut])  # the actor dies after step `cut`
            led.assert_invariant()
            if recovery == "restart":
                led.plane.give_back(ACTOR)  # a new process under the same id
            else:
                led.plane.drop_lease(ACTOR)  # as good as expired
                led.plane.reclaim_expired()
            written = led.written
            assert (led.produced, led.plane.held()) == (written, 0), f"cut after step {cut}: {LIFE[:cut][-1:]}"
            assert len(led.admit_all()) == max(capacity - written, 0), f"cut after step {cut}"
    finally:
        writer.close()
        led.close()


# -- the same with a real process killed by SIGKILL ------------------------------------------------------------

def test_sigkilled_actor_process_leaks_no_slot_and_mints_none(redis_url):
    led = Ledger(redis_url, Control(version=0, max_staleness=1000, batch_groups=1000))
    rng = random.Random(1234)
    written = []
    try:
        for rnd in range(5):
            proc = spawn_python(LEDGER_ACTOR, redis_url, ACTOR, str(rnd))
            try:
                assert proc.stdout.readline().strip() == "gave back 0"  # the test recovered already
                time.sleep(rng.uniform(0.2, 1.0))
            finally:
                sigkill(proc)
            led.assert_invariant()  # at the moment of the kill, whatever it interrupted
            if rnd % 2 == 0:
                led.plane.give_back(ACTOR)  # restart under the same id
            else:
                deadline = time.monotonic() + 5.0  # its lease lapses (0.3 s), the learner reclaims
                while led.client.exists(led.keys.lease(ACTOR)):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                led.plane.reclaim_expired()
            written.append(led.written)
            assert (led.produced, led.plane.held()) == (written[-1], 0), f"round {rnd}"
        assert written[-1] > 0  # the actor did stream groups
    finally:
        led.close()
