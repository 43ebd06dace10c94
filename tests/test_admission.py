"""Admission control: the capacity rule, and admit/cancel/reclaim against a real Redis under concurrency."""

from __future__ import annotations

import threading
import time

import pytest

from buffer import ControlPlane, admission_capacity
from configs.schema import RedisConfig
from protocol import Control, WeightsReady


@pytest.mark.parametrize("version, k, batch, expected", [
    (0, 0, 1, 1),      # synchronous, first step: one batch
    (0, 0, 8, 8),
    (5, 0, 8, 48),     # K = 0: exactly one batch ahead of the V batches consumed
    (0, 4, 8, 40),
    (10, 2, 4, 52),
])
def test_admission_capacity_is_k_plus_v_plus_one_batches(version, k, batch, expected):
    assert admission_capacity(version, k, batch) == expected


def test_admission_capacity_grows_one_batch_per_version_and_per_k():
    for v in range(5):
        for k in range(4):
            assert admission_capacity(v + 1, k, 3) - admission_capacity(v, k, 3) == 3
            assert admission_capacity(v, k + 1, 3) - admission_capacity(v, k, 3) == 3


@pytest.mark.parametrize("args", [(-1, 0, 1), (0, -1, 1), (0, 0, 0)])
def test_admission_capacity_rejects_out_of_range(args):
    with pytest.raises(ValueError):
        admission_capacity(*args)


def _plane(url: str) -> ControlPlane:
    return ControlPlane(RedisConfig(url=url, connect_timeout_s=5.0))


def test_admit_without_control_admits_nothing(redis_url):
    plane = _plane(redis_url)
    assert plane.admit("actor-0") is None
    assert plane.counters()["produced"] == 0 and plane.held() == 0


@pytest.mark.parametrize("version, k, batch", [(0, 0, 1), (0, 2, 4), (3, 1, 2)])
def test_admit_stops_exactly_at_admission_capacity(redis_url, version, k, batch):
    plane = _plane(redis_url)
    plane.write_control(Control(version=version, max_staleness=k, batch_groups=batch))
    admitted = 0
    while plane.admit("actor-0"):
        admitted += 1
        assert admitted <= 1000
    assert admitted == admission_capacity(version, k, batch)
    # the learner takes a step: exactly one more batch is admitted
    plane.write_control(Control(version=version + 1, max_staleness=k, batch_groups=batch))
    more = 0
    while plane.admit("actor-0"):
        more += 1
    assert more == batch
    assert plane.counters()["produced"] == admission_capacity(version + 1, k, batch)
    assert plane.held("actor-0") == plane.held() == admission_capacity(version + 1, k, batch)


def test_admission_returns_the_control_it_was_decided_under_and_a_wait_wakes_on_the_next(redis_url):
    """The admit script hands back the Control (and its event) it judged by, so the actor needs no second read;
    wait_control blocks until a newer Control is written and not a moment longer, and returns False on its
    timeout when none is."""
    plane = _plane(redis_url)
    plane.reset()
    assert plane.admit_with_control("actor-0", None) == (None, "no control", None, None)
    assert plane.wait_control(None, 50) is False  # nothing written yet: times out
    first = plane.write_control(Control(version=0, max_staleness=0, batch_groups=1))  # capacity 1
    assert plane.wait_control(None, 5000) is True  # any Control will do
    slot, why, ctrl, event = plane.admit_with_control("actor-0", None)
    assert slot is not None and why == "" and event == first
    assert ctrl == Control(version=0, max_staleness=0, batch_groups=1)
    refused = plane.admit_with_control("actor-0", None)
    assert refused.slot is None and refused.why == "capacity" and refused.event == first
    t0 = time.monotonic()
    assert plane.wait_control(refused.event, 300) is False  # no newer Control: the full timeout
    assert time.monotonic() - t0 >= 0.25

    def raise_capacity():
        time.sleep(0.2)
        plane.write_control(Control(version=1, max_staleness=0, batch_groups=1))  # capacity 2

    writer = threading.Thread(target=raise_capacity)
    t0 = time.monotonic()
    writer.start()
    assert plane.wait_control(refused.event, 20_000) is True
    woke = time.monotonic() - t0
    writer.join()
    assert woke < 5.0, f"woke after {woke:.1f} s: the wait did not end at the new Control"
    again = plane.admit_with_control("actor-0", None)
    assert again.slot is not None and again.control.version == 1 and again.event != first
    assert plane.client.xlen(plane.keys.control_events) == 2


def test_admit_at_counts_the_capacity_of_the_callers_weights(redis_url):
    """Weights w versions behind the learner admit w batches fewer: a group is trained at most K versions
    after the weights that sample it (not K after the learner's version, which allowed a lag of 2 K)."""
    from buffer.admission import weights_capacity

    plane = _plane(redis_url)
    plane.write_control(Control(version=5, max_staleness=2, batch_groups=2))
    cap = admission_capacity(5, 2, 2)
    assert weights_capacity(cap, 5, 2, 3) == admission_capacity(3, 2, 2) == 12
    for _ in range(12):
        assert plane.admit_at("actor-0", 3)[0] is not None
    assert plane.admit_at("actor-0", 3) == (None, "weights")  # full for v3 weights, not for the learner's
    assert plane.admit_at("actor-0", 6)[0] is not None  # newer than the learner: the learner's capacity holds
    for _ in range(3):
        assert plane.admit("actor-0", weights_version=5) is not None
    assert plane.admit_at("actor-0", 5) == (None, "capacity")
    assert plane.counters()["produced"] == plane.held() == cap
    plane.write_control(Control(version=5, max_staleness=2, batch_groups=2, stop=True))
    assert plane.admit_at("actor-0", 5) == (None, "capacity")


def test_admit_concurrent_callers_never_exceed_capacity(redis_url):
    capacity = admission_capacity(3, 2, 4)
    _plane(redis_url).write_control(Control(version=3, max_staleness=2, batch_groups=4))
    planes = [_plane(redis_url) for _ in range(8)]
    results: list[list[str]] = []
    lock = threading.Lock()
    start = threading.Barrier(len(planes))

    def actor(i: int, plane: ControlPlane) -> None:
        start.wait()
        mine = [slot for _ in range(15) if (slot := plane.admit(f"actor-{i}")) is not None]
        with lock:
            results.append(mine)

    threads = [threading.Thread(target=actor, args=(i, p)) for i, p in enumerate(planes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8
    slots = [s for mine in results for s in mine]
    assert len(slots) == len(set(slots)) == capacity  # 120 attempts, exactly capacity admitted, distinct tokens
    assert planes[0].counters()["produced"] == capacity == planes[0].held()


def test_cancel_gives_back_one_slot_and_never_goes_below_zero(redis_url):
    plane = _plane(redis_url)
    plane.write_control(Control(version=0, max_staleness=0, batch_groups=2))
    a, b = plane.admit("actor-0"), plane.admit("actor-0")
    assert a and b and a != b and plane.admit("actor-0") is None
    assert plane.cancel(a) is True
    assert plane.counters()["produced"] == 1
    c = plane.admit("actor-0")
    assert c and plane.admit("actor-0") is None
    assert plane.cancel(b) and plane.cancel(c)
    for slot in (a, b, c, "actor-0:forged", a):  # settled or unknown slots give back nothing
        assert plane.cancel(slot) is False
    assert plane.counters()["produced"] == 0 and plane.held() == 0


def test_stop_control_admits_nothing(redis_url):
    plane = _plane(redis_url)
    plane.write_control(Control(version=7, max_staleness=4, batch_groups=8, stop=True))
    assert plane.admit("actor-0") is None
    assert plane.read_control().stop is True


def test_control_and_weights_round_trip_through_the_hash(redis_url):
    plane = _plane(redis_url)
    assert plane.read_control() is None and plane.latest_weights() is None
    c = Control(version=2, max_staleness=3, lam=0.25, beta=4.0, batch_groups=8)
    w = WeightsReady(version=2, path="/tmp/w/v000002", sha256="ab" * 32, url="tcp://127.0.0.1:5591")
    plane.write_control(c)
    plane.set_weights(w)
    other = _plane(redis_url)  # another process's view
    assert other.read_control() == c
    assert other.latest_weights() == w
    assert other.counters()["capacity"] == admission_capacity(2, 3, 8)


def test_reclaim_gives_back_the_slots_of_actors_whose_lease_expired(redis_url):
    import time

    import numpy as np

    from actors.io import LeaseKeeper
    from buffer import GroupWriter
    from buffer.synthetic import synthetic_group

    cp = _plane(redis_url)
    try:
        cp.reset()
        cp.write_control(Control(version=0, max_staleness=1, batch_groups=4))  # capacity 8
        slots = {actor: [cp.admit(actor) for _ in range(n)] for actor, n in (("dead", 3), ("alive", 2), ("done", 2))}
        assert all(all(s) for s in slots.values()) and cp.counters()["produced"] == 7
        writer = GroupWriter(cp.cfg, "done")  # "done" delivered both its groups: it holds no slot
        rng = np.random.default_rng(0)
        for i, slot in enumerate(slots["done"]):
            writer.send(synthetic_group(rng, f"done{i}", n_traj=2, n_tokens=16), slot)
        assert writer.close() == 0
        alive = LeaseKeeper(cp, "alive", lease_s=0.3)  # renewed every 0.1 s: outlives the expiry below
        cp.keep_lease("dead", 0.05)
        cp.keep_lease("done", 0.05)
        time.sleep(0.4)
        assert cp.client.pttl(cp.keys.lease("alive")) > 0 and not cp.client.exists(cp.keys.lease("dead"))
        assert cp.reclaim_expired() == [("dead", 3)]  # a lapsed actor without held slots is not reported
        assert cp.counters()["produced"] == 4
        assert (cp.held("alive"), cp.held("dead"), cp.held("done"), cp.held()) == (2, 0, 0, 2)
        assert cp.reclaim_expired() == []  # idempotent
        alive.stop()  # a clean exit drops the lease at once: its slots (none by then) are free to reclaim
        assert not cp.client.exists(cp.keys.lease("alive"))
        assert cp.reclaim_expired() == [("alive", 2)] and cp.counters()["produced"] == 2
        assert cp.client.xlen(cp.keys.traj) == 2 and cp.held() == 0  # produced == written + held
        # Never below zero: a lease lapsed on more slots than are counted gives back what is there.
        cp.client.hset(cp.keys.held, mapping={f"ghost:{i}": "ghost" for i in range(5)})
        assert cp.reclaim_expired() == [("ghost", 2)] and cp.counters()["produced"] == 0
        assert cp.held() == 0
    finally:
        cp.reset()
        cp.close()


def test_admissions_a_stop_overtook_are_found_and_given_back(redis_url):
    # An actor stopping while admit_many calls are in flight on its control thread: what they admitted must be
    # given back (the SIGTERM test once found one slot held for ever).
    import asyncio

    from actors.actor import slots_admitted_late
    from actors.io import IoThread

    control = _plane(redis_url)
    control.write_control(Control(version=0, max_staleness=0, batch_groups=2))

    async def stop_with_admits_in_flight():
        io = IoThread("control-test")
        # capacity 2: the first admits one, the second the other (of three asked), the third none
        futs = [io.submit(control.admit_many, "actor-1", None, n) for n in (1, 3, 2)]
        slots = await slots_admitted_late(futs)
        for slot in slots:
            assert control.cancel(slot)
        return slots

    slots = asyncio.run(stop_with_admits_in_flight())
    assert len(slots) == 2 and all(s.startswith("actor-1:") for s in slots)
    counters = control.counters()
    assert counters["produced"] == 0 and control.held() == 0 and counters["reconciles"]


def test_admit_many_admits_in_order_while_capacity_allows_and_says_why_not_more(redis_url):
    """One script admits several groups: as many as capacity allows (the capacity of the caller's weights when it
    names them), the rest refused with the reason the next one would have been; a retry of the same tokens counts
    nothing twice."""
    from buffer.admission import ADMIT_LUA, weights_capacity

    plane = _plane(redis_url)
    plane.reset()
    assert plane.admit_many("actor-0", None, 3) == ((), "no control", None, None)
    event = plane.write_control(Control(version=4, max_staleness=1, batch_groups=2))
    cap = admission_capacity(4, 1, 2)
    a = plane.admit_many("actor-0", 3, 2 * cap)  # weights one version behind: one batch fewer
    assert len(a.slots) == weights_capacity(cap, 4, 2, 3) and a.why == "weights" and a.event == event
    b = plane.admit_many("actor-0", None, 5)
    assert len(b.slots) == cap - len(a.slots) == 2 and b.why == "capacity"
    assert plane.admit_many("actor-0", None, 1) == ((), "capacity", Control(version=4, max_staleness=1,
                                                                             batch_groups=2), event)
    assert len(set(a.slots + b.slots)) == cap == plane.held("actor-0") == plane.counters()["produced"]
    admit = plane.client.register_script(ADMIT_LUA)  # the reply of b was lost: its retry admits nothing new
    reply = admit(keys=[plane.keys.control, plane.keys.produced, plane.keys.held],
                  args=[b.slots[0], "actor-0", -1, b.slots[1]])
    assert reply[0] == 1 and reply[3] == 2 and plane.counters()["produced"] == cap
    with pytest.raises(ValueError, match="n must be >= 1"):
        plane.admit_many("actor-0", None, 0)
