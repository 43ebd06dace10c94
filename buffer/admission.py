"""Admission control: the capacity rule, and the admission ledger's atomic server-side scripts.

The rule (AReaL-style capacity, global across actors through one Redis counter):

    admitted while  produced < (K + V + 1) * batch_groups

V is the learner's version, K the staleness cap from the controller. The learner writes the capacity next
to its Control message (``ControlPlane.write_control``).

The ledger. Every admission is a *slot token* ``"<actor_id>:<16 hex digits>"``, drawn by the actor
(``secrets``: a garbage writer cannot guess one). A slot goes through these states, each change one Lua
script, so a process killed between any two of them leaks no slot and mints none:

    (free) --admit--> held --deliver--> delivered --ack--> consumed
                        |                   |
                        |                   +--dead letter--> (free)
                        +--cancel / give back / reclaim--> (free)

* admitted -> held: :data:`ADMIT_LUA` (``ControlPlane.admit``): if produced < capacity, INCR ``produced``
  and HSET ``<prefix>:held`` token -> actor id, in one step however many actors race.
* held -> delivered: :data:`DELIVER_LUA` (``GroupWriter``'s sender thread, one call per entry): XADD the
  group to ``<prefix>:traj`` with its ``slot`` field, HDEL the token from ``held``, and note the new stream
  id in ``<prefix>:delivered`` (stream id -> token). A token that is no longer held (reclaimed after its
  actor's lease lapsed, or an at-least-once retry writing the entry a second time) counts again: INCR
  ``produced``.
* held -> cancelled: :data:`CANCEL_LUA` (``ControlPlane.cancel``): an admitted group that never reaches the
  writer. HDEL the token; DECR ``produced`` only if it was held (cancelling twice gives back once).
* held -> given back: :data:`GIVE_BACK_LUA` (``ControlPlane.give_back``, an actor restarted under the same
  id) and :data:`RECLAIM_LUA` (``ControlPlane.reclaim_expired``, the learner, for actors whose lease key
  ``<prefix>:lease:<actor>`` expired): HDEL every such token, DECRBY ``produced``.
* delivered -> consumed: :data:`ACK_LUA` (``GroupReader.ack``): XACK + XDEL, HDEL the stream id from
  ``delivered`` and INCR ``consumed_admitted`` for each id that HDEL removed; the slot stays counted in
  ``produced`` (the learner trained on it). (``consumed`` counts every acked entry, slot or not.)
* delivered -> free: :data:`DEAD_LETTER_LUA` (``GroupReader``: an invalid entry, a stale one, or one delivered
  more than ``redis.max_deliveries`` times): DECR ``produced`` only if
  HDEL ``delivered`` <stream id> == 1. Only the deliver script writes ``delivered``, so garbage XADDed
  straight into the stream (no slot, or a forged or copied one) is dead-lettered without moving capacity,
  and an admitted entry gives its slot back once.

The invariant, kept by every script (and so at every instant, whatever process dies when):

    produced == HLEN held + admitted entries written and not dead-lettered

so with no reader (tests), ``produced == XLEN traj + HLEN held``; once an actor's held slots are given
back or reclaimed, the capacity left is exactly capacity - what was written.

Split the admitted entries written and not dead-lettered into those acked (``consumed_admitted``) and those
not yet acked (still in ``delivered``), and the invariant becomes an identity of four numbers Redis holds:

    produced == consumed_admitted + queued + held        (queued = HLEN delivered, held = HLEN held)

Every script keeps it: admit (produced +1, held +1), deliver (held -1 or produced +1; queued +1), cancel /
give back / reclaim (held -n, produced -n), ack (queued -n, consumed_admitted +n, same ids: HDEL's count),
dead letter (queued -1, produced -1, once per admitted entry), and a plain XADD or a garbage entry moves
none of them. ``ControlPlane.counters`` (``reconciles``) and ``python -m buffer stats`` check it on one
atomic snapshot (MULTI/EXEC); a MISMATCH means something wrote these keys outside the scripts.
``consumed_admitted`` is a counter of its own because ``consumed`` also counts entries written without a
slot (benchmarks, tools), which never held capacity.
"""

from __future__ import annotations


def admission_capacity(version: int, max_staleness: int, batch_groups: int) -> int:
    """Groups actors may have produced in total while the learner is at ``version``.

    capacity = (K + V + 1) * batch_groups, with K = ``max_staleness`` and V = ``version``.

    The learner has consumed about V * batch_groups groups by version V; the next batch_groups feed step
    V + 1, and K more batches may be in flight ahead of it. So no admitted group is more than K versions
    older than the learner when it is trained (for groups generated with a single policy version).
    K = 0 is the synchronous schedule: exactly one batch ahead.
    """
    if version < 0 or max_staleness < 0 or batch_groups < 1:
        raise ValueError(f"admission_capacity: need version >= 0, max_staleness >= 0, batch_groups >= 1 "
                         f"(got {version}, {max_staleness}, {batch_groups})")
    return (max_staleness + version + 1) * batch_groups


def ledger_reconciles(produced: int, consumed_admitted: int, queued: int, held: int) -> bool:
    """The ledger's identity ``produced == consumed_admitted + queued + held`` (see the module docstring):
    every admitted slot is acked, still in the stream (``queued``: HLEN delivered), or held by an actor."""
    return produced == consumed_admitted + queued + held


# Lua helper shared by the scripts below: give_back(counter, n) decrements the counter by n, never below 0
# (a give-back without an admit must not mint capacity), and returns what it gave back.
_GIVE_BACK_FN = """
local function give_back(counter, n)
  local produced = tonumber(redis.call('GET', counter) or '0')
  local give = math.min(n, produced)
  if give > 0 then redis.call('DECRBY', counter, give) end
  return math.max(give, 0)
end
"""

def weights_capacity(capacity: int, version: int, batch_groups: int, weights_version: int) -> int:
    """The capacity for a group sampled with weights ``weights_version`` while the learner is at ``version``:
    ``capacity`` less one batch per version the weights are behind, i.e. (K + weights_version + 1) *
    batch_groups. A group admitted under it is trained about K versions after its weights at most, not K
    after the learner's version (which, with weights up to K versions old, allowed a lag of 2 K)."""
    return capacity - max(version - weights_version, 0) * batch_groups


# admitted -> held, for one group or several. KEYS[1] control hash, KEYS[2] produced counter, KEYS[3] held hash;
# ARGV[1] slot token (drawn by the caller), ARGV[2] actor id, ARGV[3] the weights version the group will be
# sampled with (-1: not known, the learner's capacity alone), ARGV[4..] more slot tokens for more groups. The
# control hash holds 'capacity' and beside it the 'version' and 'batch_groups' it was computed from
# (weights_capacity). The tokens are admitted in order while capacity allows.
# Returns {code, control, event, admitted}: admitted is how many tokens, from the first, are held now; code 1 when
# all are, else why the next one was not: 0 at capacity, 2 at the capacity of the caller's weights only (newer
# weights would be admitted), -1 no control written yet. control is the encoded Control the decision was made
# under and event the id of its entry in the control-events stream (false with -1), so that the actor needs no
# second round trip to read the Control, and can block until a newer one exists. A token already held counts as
# admitted without counting again: a retry after a lost reply is harmless.
ADMIT_LUA = """
local c = redis.call('HMGET', KEYS[1], 'control', 'event', 'capacity', 'version', 'batch_groups')
local ctl, ev = c[1], c[2]
local cap = tonumber(c[3] or '-1')
local produced = tonumber(redis.call('GET', KEYS[2]) or '0')
local w = tonumber(ARGV[3] or '-1')
local v = tonumber(c[4] or '-1')
local bg = tonumber(c[5] or '0')
local admitted = 0
for i = 1, math.max(#ARGV - 2, 1) do
  local token = ARGV[1]
  if i > 1 then token = ARGV[i + 2] end
  if redis.call('HEXISTS', KEYS[3], token) == 0 then
    if not c[3] then return {-1, false, false, admitted} end
    if produced >= cap then return {0, ctl, ev, admitted} end
    if w >= 0 and v > w and produced >= cap - (v - w) * bg then return {2, ctl, ev, admitted} end
    redis.call('INCR', KEYS[2])
    redis.call('HSET', KEYS[3], token, ARGV[2])
    produced = produced + 1
  end
  admitted = admitted + 1
end
return {1, ctl, ev, admitted}
"""

# The learner's Control and what admission reads beside it, in one step, plus an entry in the control-events
# stream whose id goes into the hash as 'event'. KEYS[1] control hash, KEYS[2] control-events stream; ARGV[1]
# encode(Control), ARGV[2] capacity, ARGV[3] version, ARGV[4] batch_groups. Returns the event id.
WRITE_CONTROL_LUA = """
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', '64', '*', 'version', ARGV[3])
redis.call('HSET', KEYS[1], 'control', ARGV[1], 'capacity', ARGV[2], 'version', ARGV[3], 'batch_groups', ARGV[4],
           'event', id)
return id
"""

# held -> delivered. KEYS[1] stream, KEYS[2] held hash, KEYS[3] produced counter, KEYS[4] delivered hash;
# ARGV[1] encoded group, ARGV[2] slot token. Returns the new entry's id.
# XADD the entry (fields data, slot), settle the slot (HDEL held); a token that was not held (reclaimed
# meanwhile, or this is a retry writing the entry again) is counted anew (INCR produced), so that
# produced == held + written holds. The id is noted in delivered so that a dead letter can give it back.
DELIVER_LUA = """
local id = redis.call('XADD', KEYS[1], '*', 'data', ARGV[1], 'slot', ARGV[2])
if redis.call('HDEL', KEYS[2], ARGV[2]) == 0 then redis.call('INCR', KEYS[3]) end
redis.call('HSET', KEYS[4], id, ARGV[2])
return id
"""

# held -> cancelled. KEYS[1] held hash, KEYS[2] produced counter; ARGV[1] slot token.
# Returns 1 if the token was held (and its slot given back), 0 otherwise (unknown or already settled: the
# slot was delivered, cancelled, given back or reclaimed before; nothing is minted).
CANCEL_LUA = _GIVE_BACK_FN + """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  give_back(KEYS[2], 1)
  return 1
end
return 0
"""

# held -> given back (an actor restarted under the same id). KEYS[1] held hash, KEYS[2] produced counter;
# ARGV[1] actor id. HDEL every token held by that actor and DECRBY produced by their number (never below 0).
# Returns the slots given back.
GIVE_BACK_LUA = _GIVE_BACK_FN + """
local fields = redis.call('HGETALL', KEYS[1])
local n = 0
for i = 1, #fields, 2 do
  if fields[i + 1] == ARGV[1] then
    redis.call('HDEL', KEYS[1], fields[i])
    n = n + 1
  end
end
return give_back(KEYS[2], n)
"""

# KEYS[1] stream, KEYS[2] consumed counter, KEYS[3] delivered hash, KEYS[4] consumed_admitted counter;
# ARGV[1] group, ARGV[2..] entry ids (at most ACK_CHUNK). delivered -> consumed: XACK then XDEL the ids (stream
# memory stays bounded by what is unconsumed) and HDEL them from delivered (so does that hash). ``consumed``
# counts the ids this call acked (every entry, admitted or written without a slot by a tool or benchmark);
# ``consumed_admitted`` counts the ids this call removed from delivered (admitted entries only: the number
# that reconciles with the ledger). Either way acking twice (e.g. a restarted learner re-acking its
# checkpoint's ids) counts once. The slots stay counted in produced: the learner trained on them.
ACK_LUA = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
local settled = redis.call('HDEL', KEYS[3], unpack(ARGV, 2))
if acked > 0 then redis.call('INCRBY', KEYS[2], acked) end
if settled > 0 then redis.call('INCRBY', KEYS[4], settled) end
return acked
"""
# Lua's unpack() is bounded by its C stack (about 8,000 values): larger acks go in chunks.
ACK_CHUNK = 1000

# KEYS[1] stream, KEYS[2] dead stream, KEYS[3] dead counter, KEYS[4] produced counter, KEYS[5] delivered
# hash; ARGV[1] group, ARGV[2] entry id, ARGV[3] reason, ARGV[4] raw data, ARGV[5] dead stream cap.
# Moves one entry to the dead-letter stream. Only the call that acks it records it, so an entry seen by
# two consumers is dead-lettered once. An admitted entry (its id noted in delivered by DELIVER_LUA) also
# gives back its admission slot: it will never be trained on, and otherwise it would eat the capacity the
# learner needs to advance. Garbage written straight into the stream never was in delivered, whatever its
# slot field says, so it moves no capacity; and HDEL == 1 happens once per entry, so no slot comes back twice.
DEAD_LETTER_LUA = _GIVE_BACK_FN + """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
local admitted = redis.call('HDEL', KEYS[5], ARGV[2])
if admitted == 1 then give_back(KEYS[4], 1) end
if acked == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'reason', ARGV[3], 'source_id', ARGV[2], 'data', ARGV[4])
redis.call('INCR', KEYS[3])
return 1
"""

# held -> given back (the learner, for dead actors). KEYS[1] held hash, KEYS[2] produced counter; ARGV[1]
# lease key prefix ("<prefix>:lease:"). For every token of the held hash whose actor's lease key
# <prefix>:lease:<actor> is gone: HDEL it and give its slot back (DECRBY produced, never below 0). Returns a
# flat list actor, slots, actor, slots ... of what was given back, actors in the order first met. Lease keys
# are built here from ARGV, so this script needs a single Redis node (no cluster), like the rest of dcrl.
RECLAIM_LUA = _GIVE_BACK_FN + """
local fields = redis.call('HGETALL', KEYS[1])
local alive = {}
local counts = {}
local order = {}
for i = 1, #fields, 2 do
  local actor = fields[i + 1]
  if alive[actor] == nil then
    alive[actor] = redis.call('EXISTS', ARGV[1] .. actor) == 1
  end
  if not alive[actor] then
    redis.call('HDEL', KEYS[1], fields[i])
    if counts[actor] == nil then
      counts[actor] = 0
      table.insert(order, actor)
    end
    counts[actor] = counts[actor] + 1
  end
end
local out = {}
for _, actor in ipairs(order) do
  table.insert(out, actor)
  table.insert(out, give_back(KEYS[2], counts[actor]))
end
return out
"""
