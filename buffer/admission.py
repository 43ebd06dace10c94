"""Admission control: how many groups actors may have produced, and the atomic server-side scripts.

The rule (AReaL-style capacity, global across actors through one Redis counter):

    admitted while  produced < (K + V + 1) * batch_groups

V is the learner's version, K the staleness cap from the controller. The learner writes the capacity next
to its Control message (``ControlPlane.write_control``); actors call ``ControlPlane.try_admit`` before they
start a group, which runs :data:`TRY_ADMIT_LUA` so that the compare and the increment are one step no
matter how many actors race.
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


# KEYS[1] control hash, KEYS[2] produced counter.
# Returns 1 admitted (counter incremented), 0 at capacity, -1 no control written yet (not admitted).
TRY_ADMIT_LUA = """
local cap = redis.call('HGET', KEYS[1], 'capacity')
if not cap then return -1 end
local produced = tonumber(redis.call('GET', KEYS[2]) or '0')
if produced < tonumber(cap) then
  redis.call('INCR', KEYS[2])
  return 1
end
return 0
"""

# KEYS[1] produced counter. Decrement, never below 0 (a release without an admit must not mint capacity).
RELEASE_LUA = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then return redis.call('DECR', KEYS[1]) end
return 0
"""

# KEYS[1] stream, KEYS[2] consumed counter; ARGV[1] group, ARGV[2..] entry ids (at most ACK_CHUNK).
# XACK then XDEL the ids (stream memory stays bounded by what is unconsumed); counts only the ids this
# call acked, so acking twice (e.g. a restarted learner re-acking its checkpoint's ids) counts once.
ACK_LUA = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
if acked > 0 then redis.call('INCRBY', KEYS[2], acked) end
return acked
"""
# Lua's unpack() is bounded by its C stack (about 8,000 values): larger acks go in chunks.
ACK_CHUNK = 1000

# KEYS[1] stream, KEYS[2] dead stream, KEYS[3] dead counter, KEYS[4] produced counter;
# ARGV[1] group, ARGV[2] entry id, ARGV[3] reason, ARGV[4] raw data, ARGV[5] dead stream cap.
# Moves one entry to the dead-letter stream. Only the call that acks it records it, so an entry seen by
# two consumers is dead-lettered once. The rejected group also gives back its admission slot: it will
# never be trained on, and otherwise garbage would eat the capacity the learner needs to advance.
DEAD_LETTER_LUA = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if acked == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'reason', ARGV[3], 'source_id', ARGV[2], 'data', ARGV[4])
redis.call('INCR', KEYS[3])
local n = tonumber(redis.call('GET', KEYS[4]) or '0')
if n > 0 then redis.call('DECR', KEYS[4]) end
return 1
"""

# KEYS[1] control hash, KEYS[2] produced counter; ARGV[1] lease key prefix ("<prefix>:lease:").
# For every field held:<actor> of the control hash whose lease key <prefix>:lease:<actor> is gone: give its
# admitted-but-undelivered slots back (DECRBY produced, never below 0) and delete the field. Returns a flat
# list actor, slots, actor, slots ... of what was given back. Lease keys are built here from ARGV, so this
# script needs a single Redis node (no cluster), like the rest of dcrl.
RECLAIM_LUA = """
local out = {}
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local f = fields[i]
  if string.sub(f, 1, 5) == 'held:' then
    local actor = string.sub(f, 6)
    if redis.call('EXISTS', ARGV[1] .. actor) == 0 then
      local n = tonumber(fields[i + 1]) or 0
      if n > 0 then
        local produced = tonumber(redis.call('GET', KEYS[2]) or '0')
        local give = math.min(n, produced)
        if give > 0 then redis.call('DECRBY', KEYS[2], give) end
        table.insert(out, actor)
        table.insert(out, give)
      end
      redis.call('HDEL', KEYS[1], f)
    end
  end
end
return out
"""
