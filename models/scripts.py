"""The chunk log's Lua scripts (``models.chunklog`` registers them).

Every script that adds entries to a log also publishes them on the stream's live channel in
the same atomic step, so a web process subscribed to the channel sees each write exactly
when it is durable. Times come from the Redis server's clock (``TIME``).
"""

from __future__ import annotations

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local FINAL = {done = 'done', cancelled = 'cancelled', error = 'failed'}
local function last_seq(log)
  local e = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  if e[1] then return tonumber(string.match(e[1][1], '-(%d+)$')) end
  return 0
end
local function finished(status)
  return status == 'done' or status == 'cancelled' or status == 'failed'
end
local function publish(channel, first, types, datas)
  redis.call('PUBLISH', channel, cjson.encode({first, types, datas}))
end
"""

# KEYS: state, log. ARGV: running ttl.
INIT = (
    _PRELUDE
    + """
redis.call('HSET', KEYS[1], 'status', 'queued', 'qt', now)
redis.call('HDEL', KEYS[1], 'cancel', 'hb', 'task', 'rq')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return redis.call('HGET', KEYS[1], 'attempt') or '0'
"""
)

# KEYS: state, log. ARGV: task id, stale ms, running ttl, worker name, last attempt in SQL.
# The attempt never goes back below SQL's, even if Redis lost the state hash.
CLAIM = (
    _PRELUDE
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'hb', 'cancel')
if finished(st[1]) then return {'finished', tonumber(st[2] or '0'), 0, 0} end
if st[1] == 'running' and st[3] and (now - tonumber(st[3])) < tonumber(ARGV[2]) then
  return {'busy', tonumber(st[2] or '0'), 0, 0}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
if attempt <= tonumber(ARGV[5]) then
  attempt = tonumber(ARGV[5]) + 1
  redis.call('HSET', KEYS[1], 'attempt', attempt)
end
redis.call('HSET', KEYS[1], 'status', 'running', 'hb', now, 'task', ARGV[1], 'worker', ARGV[4])
redis.call('HDEL', KEYS[1], 'rq')
redis.call('EXPIRE', KEYS[1], ARGV[3])
local cancel = 0
if st[4] == '1' then cancel = 1 end
return {'claimed', attempt, last_seq(KEYS[2]), cancel}
"""
)

# KEYS: state, log. ARGV: channel, attempt, running ttl, retention, first seq, then a type
# and a data argument per event (seqs first, first + 1, ...). All events or none are added:
# the first XADD is the fence (Redis refuses an ID that is not above the last one), and
# the rest follow it. A terminal event, which is always last, sets the final status.
APPEND = (
    _PRELUDE
    + """
local st = redis.call('HMGET', KEYS[1], 'attempt', 'status', 'cancel')
if st[1] ~= ARGV[2] or st[2] ~= 'running' then return {'stale', 0} end
local first = tonumber(ARGV[5])
local added = redis.pcall('XADD', KEYS[2], '0-' .. first, 't', ARGV[6], 'd', ARGV[7])
if type(added) == 'table' and added.err then return {'stale', 0} end
local types, datas = {ARGV[6]}, {ARGV[7]}
local seq = first
for i = 8, #ARGV, 2 do
  seq = seq + 1
  redis.call('XADD', KEYS[2], '0-' .. seq, 't', ARGV[i], 'd', ARGV[i + 1])
  types[#types + 1] = ARGV[i]
  datas[#datas + 1] = ARGV[i + 1]
end
redis.call('HSET', KEYS[1], 'hb', now, 'seq', seq)
local ttl = ARGV[3]
local final = FINAL[types[#types]]
if final then
  redis.call('HSET', KEYS[1], 'status', final)
  ttl = ARGV[4]
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
publish(ARGV[1], first, types, datas)
local cancel = 0
if st[3] == '1' then cancel = 1 end
return {'ok', cancel}
"""
)

# KEYS: state. ARGV: attempt.
HEARTBEAT = (
    _PRELUDE
    + """
local st = redis.call('HMGET', KEYS[1], 'attempt', 'status', 'cancel')
if st[1] ~= ARGV[1] or st[2] ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'hb', now)
if st[3] == '1' then return 2 end
return 1
"""
)

# KEYS: state, log. ARGV: stale ms, running ttl.
# A running attempt with a live heartbeat gets the cancel flag and ends the stream itself at
# its next append. Nobody is writing a queued stream (or one whose writer is dead), so the
# canceller takes it over as a new attempt (fencing off any late worker) and ends it like a
# writer would: final text to SQL first, then the cancelled event. If the canceller dies in
# between, the sweeper's next attempt sees the cancel flag and ends it.
CANCEL = (
    _PRELUDE
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'hb')
if finished(st[1]) then return {'finished', 0, 0} end
redis.call('HSET', KEYS[1], 'cancel', '1')
if st[1] == 'running' and st[2] and (now - tonumber(st[2])) < tonumber(ARGV[1]) then
  return {'requested', 0, 0}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'hb', now)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {'taken', attempt, last_seq(KEYS[2])}
"""
)

# KEYS: state. ARGV: attempt. Make a live attempt's heartbeat stale at once (hand-off).
RELEASE = """
local st = redis.call('HMGET', KEYS[1], 'attempt', 'status')
if st[1] ~= ARGV[1] or st[2] ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'hb', 0)
return 1
"""

# KEYS: state. ARGV: stale ms, queued grace ms, running ttl.
# Decide (once per stale period) that a stream needs its task sent again: its writer's
# heartbeat is stale, it has sat queued too long, or Redis lost its state entirely.
MARK_REQUEUE = (
    _PRELUDE
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'hb', 'qt', 'rq')
if finished(st[1]) then return 0 end
if st[1] == 'running' and st[2] and (now - tonumber(st[2])) < tonumber(ARGV[1]) then return 0 end
if st[1] == 'queued' and st[3] and (now - tonumber(st[3])) < tonumber(ARGV[2]) then return 0 end
if st[4] and (now - tonumber(st[4])) < tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'rq', now)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# KEYS: state, log. ARGV: channel, stale ms, retention, final status, then seq/type/data
# triples. Take over a stream whose writer is dead and end it with the given events (from
# SQL), adding those above the log's last entry.
SEAL = (
    _PRELUDE
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'hb')
if finished(st[1]) then return 'finished' end
if st[1] == 'running' and st[2] and (now - tonumber(st[2])) < tonumber(ARGV[2]) then
  return 'busy'
end
local last = last_seq(KEYS[2])
local first, types, datas = nil, {}, {}
for i = 5, #ARGV, 3 do
  if tonumber(ARGV[i]) > last then
    redis.call('XADD', KEYS[2], '0-' .. ARGV[i], 't', ARGV[i + 1], 'd', ARGV[i + 2])
    first = first or tonumber(ARGV[i])
    types[#types + 1] = ARGV[i + 1]
    datas[#datas + 1] = ARGV[i + 2]
  end
end
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'seq', ARGV[#ARGV - 2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if first then publish(ARGV[1], first, types, datas) end
return 'sealed'
"""
)

# KEYS: state, log. ARGV: channel, running ttl, task id.
# Admin retry: a finished stream is queued again, after a "resumed" marker event.
REOPEN = (
    _PRELUDE
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if not finished(st[1]) then return {'not_finished', 0, 0} end
local seq = last_seq(KEYS[2]) + 1
local next_attempt = tonumber(st[2] or '0') + 1
redis.call('XADD', KEYS[2], '0-' .. seq, 't', 'resumed', 'd', next_attempt)
redis.call('HSET', KEYS[1], 'status', 'queued', 'task', ARGV[3], 'qt', now, 'seq', seq)
redis.call('HDEL', KEYS[1], 'cancel', 'hb', 'rq')
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
publish(ARGV[1], seq, {'resumed'}, {tostring(next_attempt)})
return {'reopened', seq, next_attempt}
"""
)
