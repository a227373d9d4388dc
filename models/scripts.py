"""The chunk log's Lua scripts (``models.chunklog`` registers them).

Every script that adds entries to a log also publishes them on the stream's live channel in
the same atomic step, so a web process subscribed to the channel sees each write exactly
when it is durable. Times come from the Redis server's clock (``TIME``). On a Redis Cluster
of Redis 7 or later they publish with ``SPUBLISH`` instead (``sharded``): the message stays
on the stream's own primary, where the web tier's hubs subscribe to it.
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
-- Since when (ms) no viewer has been attached to the stream; nil while one is (a lease in
-- the viewers set runs past now) or when that is unknown. Before any viewer: since queued.
local function unwatched_since(state, viewers, now)
  local top = redis.call('ZREVRANGE', viewers, 0, 0, 'WITHSCORES')
  local since = tonumber(redis.call('HGET', state, 'qt') or '0')
  if top[2] then
    local until_ms = tonumber(top[2])
    if until_ms > now then return nil end
    if until_ms > since then since = until_ms end
  end
  if since == 0 then return nil end
  return since
end
-- The detach policy: 'dp' ms without a viewer cancels the stream (reason 'abandoned').
-- Returns 'abandoned' (the cancel flag is now set), 'counting' (no viewer, not yet) or nil.
local function detach_check(state, viewers, now)
  local dp = redis.call('HGET', state, 'dp')
  if not dp then return nil end
  local since = unwatched_since(state, viewers, now)
  if not since then return nil end
  if now - since >= tonumber(dp) then
    redis.call('HSET', state, 'cancel', '1', 'why', 'abandoned')
    return 'abandoned'
  end
  return 'counting'
end
"""

# KEYS: state, log. ARGV: running ttl, detach policy ms (0: continue).
INIT = (
    _PRELUDE
    + """
redis.call('HSET', KEYS[1], 'status', 'queued', 'qt', now)
redis.call('HDEL', KEYS[1], 'cancel', 'why', 'hb', 'task', 'rq', 'rqn', 'sent', 'qn', 'qs', 'xt',
  'miss')
if tonumber(ARGV[2] or '0') > 0 then
  redis.call('HSET', KEYS[1], 'dp', ARGV[2])
else
  redis.call('HDEL', KEYS[1], 'dp')
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return redis.call('HGET', KEYS[1], 'attempt') or '0'
"""
)

# KEYS: state, log[, viewers]. ARGV: task id, stale ms, running ttl, worker name, last
# attempt in SQL. With the viewers key (a stream with a detach policy), one abandoned under
# its policy is claimed with the cancel flag.
# The attempt never goes back below SQL's, even if Redis lost the state hash. 'tries' counts
# claims against RELAY_MAX_ATTEMPTS (the caller enforces it); a claim clears the recovery
# marks ('rq', 'rqn': a copy sent by the sweeper or a hand-off is out).
CLAIM = (
    _PRELUDE
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'hb', 'cancel')
if finished(st[1]) then return {'finished', tonumber(st[2] or '0'), 0, 0, 0} end
if st[1] == 'running' and st[3] and (now - tonumber(st[3])) < tonumber(ARGV[2]) then
  return {'busy', tonumber(st[2] or '0'), 0, 0, 0}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
if attempt <= tonumber(ARGV[5]) then
  attempt = tonumber(ARGV[5]) + 1
  redis.call('HSET', KEYS[1], 'attempt', attempt)
end
local tries = redis.call('HINCRBY', KEYS[1], 'tries', 1)
local last = last_seq(KEYS[2])
redis.call('HSET', KEYS[1], 'status', 'running', 'hb', now, 'task', ARGV[1], 'worker', ARGV[4],
           'seq', last)
redis.call('HDEL', KEYS[1], 'rq', 'rqn', 'xt')
redis.call('EXPIRE', KEYS[1], ARGV[3])
local cancel = 0
if st[4] == '1' or (KEYS[3] and detach_check(KEYS[1], KEYS[3], now) == 'abandoned') then
  cancel = 1
end
return {'claimed', attempt, last, cancel, tries}
"""
)

# Append events to a stream as its attempt: the events' types and data are args[from],
# args[from + 1], ... args[last] (pairs), their seqs first, first + 1, ... All events or none
# are added: the first XADD is the fence (Redis refuses an ID that is not above the last
# one), and the rest follow it. A terminal event, which is always last, sets the final status
# and records whether a viewer was attached at that moment ('ew', for the completion
# webhook, from the viewers key, given only then: a key that may not exist in a multi-key call
# makes Redis Cluster refuse it while the slot migrates). The keys' running TTL is refreshed
# on an attempt's first append and then whenever a tenth of it has passed ('xt': when; every
# script that starts an attempt or queues the stream clears it). {'ok', 1 if a cancel is
# pending else 0}, {'stale', 0} (another attempt owns the stream) or {'behind', the log's
# last seq} (the log ends before first - 1: a failover lost appends).
_APPEND_EVENTS = """
local function append_events(state, log, viewers, channel, attempt, ttl, retention, first,
                             args, from, last)
  local st = redis.call('HMGET', state, 'attempt', 'status', 'cancel', 'seq', 'xt')
  if st[1] ~= attempt or st[2] ~= 'running' then return {'stale', 0} end
  local have = tonumber(st[4] or last_seq(log))
  if have < first - 1 then return {'behind', have} end
  local added = redis.pcall('XADD', log, '0-' .. first, 't', args[from], 'd', args[from + 1])
  if type(added) == 'table' and added.err then return {'stale', 0} end
  local types, datas = {args[from]}, {args[from + 1]}
  local seq = first
  for i = from + 2, last, 2 do
    seq = seq + 1
    redis.call('XADD', log, '0-' .. seq, 't', args[i], 'd', args[i + 1])
    types[#types + 1] = args[i]
    datas[#datas + 1] = args[i + 1]
  end
  local final = FINAL[types[#types]]
  if final then
    local watched = '0'
    if viewers then
      local top = redis.call('ZREVRANGE', viewers, 0, 0, 'WITHSCORES')
      if top[2] and tonumber(top[2]) > now then watched = '1' end
    end
    redis.call('HSET', state, 'hb', now, 'seq', seq, 'status', final, 'ew', watched)
    redis.call('EXPIRE', state, retention)
    redis.call('EXPIRE', log, retention)
  elseif st[5] and now - tonumber(st[5]) < tonumber(ttl) * 100 then
    redis.call('HSET', state, 'hb', now, 'seq', seq)
  else
    redis.call('HSET', state, 'hb', now, 'seq', seq, 'xt', now)
    redis.call('EXPIRE', state, ttl)
    redis.call('EXPIRE', log, ttl)
  end
  publish(channel, first, types, datas)
  if st[3] == '1' then return {'ok', 1} end
  return {'ok', 0}
end
"""

# KEYS: state, log[, viewers]. ARGV: channel, attempt, running ttl, retention, first seq,
# then a type and a data argument per event (seqs first, first + 1, ...). See append_events.
APPEND = (
    _PRELUDE
    + _APPEND_EVENTS
    + """
return append_events(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                     tonumber(ARGV[5]), ARGV, 6, #ARGV)
"""
)

# Many streams' appends in one call (the worker's round trip, on one Redis server: never on a
# cluster, where a script's keys must share a slot). KEYS: each stream's state, log[, viewers].
# ARGV: running ttl, retention, then per stream: its key count (2 or 3), channel, attempt,
# first seq, event count, and a type and a data argument per event. Each stream's append is
# APPEND's, all or none, and independent of the others': a reply per stream, in order,
# APPEND's reply or {'error', message} (a command inside failed; its stream's earlier events
# may stand, as when APPEND fails, and the other streams go on).
APPEND_ALL = (
    _PRELUDE
    + _APPEND_EVENTS
    + """
local out, k, a = {}, 1, 3
while a <= #ARGV do
  local nkeys, n = tonumber(ARGV[a]), tonumber(ARGV[a + 4])
  local viewers = nil
  if nkeys == 3 then viewers = KEYS[k + 2] end
  local ok, reply = pcall(append_events, KEYS[k], KEYS[k + 1], viewers, ARGV[a + 1],
                          ARGV[a + 2], ARGV[1], ARGV[2], tonumber(ARGV[a + 3]), ARGV, a + 5,
                          a + 4 + 2 * n)
  if not ok then
    if type(reply) == 'table' then reply = reply.err end
    reply = {'error', tostring(reply)}
  end
  out[#out + 1] = reply
  k = k + nkeys
  a = a + 5 + 2 * n
end
return out
"""
)

# KEYS: state[, viewers]. ARGV: attempt. 0: not the owner (or it left its end); 1: go on;
# 2: cancel (asked, or, with the viewers key, abandoned under the detach policy just now);
# 3: go on, no viewer (the policy counts down).
HEARTBEAT = (
    _PRELUDE
    + """
local st = redis.call('HMGET', KEYS[1], 'attempt', 'status', 'cancel', 'end')
-- A writer that left its end for the sweeper has stepped aside: no beat makes it look alive.
if st[1] ~= ARGV[1] or st[2] ~= 'running' or st[4] then return 0 end
redis.call('HSET', KEYS[1], 'hb', now)
if st[3] == '1' then return 2 end
if not KEYS[2] then return 1 end
local detach = detach_check(KEYS[1], KEYS[2], now)
if detach == 'abandoned' then return 2 end
if detach == 'counting' then return 3 end
return 1
"""
)

# KEYS: state, log. ARGV: stale ms, running ttl, cancel flag (1: set it, 0: do not).
# Take a stream over from outside its writer to end it (a cancel, or the sweeper ending a
# stream past its attempt budget). A running attempt with a live heartbeat cannot be taken:
# with the cancel flag it gets the flag and ends the stream itself at its next append. Nobody
# is writing a queued stream (or one whose writer is dead), so the caller takes it over as a
# new attempt (fencing off any late worker) and ends it like a writer would: final text to
# SQL first (fenced by the same attempt), then the terminal event. If the caller dies in
# between, the sweeper's next pass finishes the job.
TAKE_OVER = (
    _PRELUDE
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'hb')
if finished(st[1]) then return {'finished', 0, 0} end
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'cancel', '1') end
if st[1] == 'running' and st[2] and (now - tonumber(st[2])) < tonumber(ARGV[1]) then
  return {'requested', 0, 0}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'hb', now)
redis.call('HDEL', KEYS[1], 'rq', 'rqn', 'end', 'xt')
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {'taken', attempt, last_seq(KEYS[2])}
"""
)

# KEYS: state. ARGV: attempt. Make a live attempt's heartbeat stale at once (hand-off); the
# caller sends the task again, so a copy is on its way ('rq': the sweeper does not send
# another). A hand-off is the operator's doing (a deploy), not the stream's: it does not
# count against the attempt budget.
RELEASE = (
    _PRELUDE
    + """
local st = redis.call('HMGET', KEYS[1], 'attempt', 'status')
if st[1] ~= ARGV[1] or st[2] ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'hb', 0, 'rq', now)
redis.call('HINCRBY', KEYS[1], 'rqn', 1)
return 1
"""
)

# KEYS: state. ARGV: attempt, the end as JSON ({"status", "error"}).
# The writer has every piece in the log and knows how the answer ends, but SQL stayed
# unreachable past the budget: record the end and step aside (stale heartbeat), so the
# sweeper stores it in SQL and writes the terminal event once SQL answers again.
PEND_END = """
local st = redis.call('HMGET', KEYS[1], 'attempt', 'status')
if st[1] ~= ARGV[1] or st[2] ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'end', ARGV[2], 'hb', 0)
return 1
"""

# KEYS: state. ARGV: stale ms, queued grace ms, running ttl, attempt budget, unsent grace ms,
# resend wait ms.
# Decide that a stream needs its task sent again (the sweeper then sends it): its writer's
# heartbeat is stale, it has sat queued too long, it was committed but its task was never
# marked sent, or the log has no state for it (the post died between its commit and the
# log's init, or Redis lost the state). A stream without state is sent once it has had none
# for the unsent grace on Redis's clock, from the first call that found it so ('miss'): a
# post between its commit and its init (the commit may have waited long for a lock) is not
# sent a copy for an age its SQL row alone would suggest. Not while a copy sent by recovery
# ('rq': the sweeper's or a hand-off's) may still wait in the queue: the next send waits
# resend wait x 2^(sends - 1), 'rqn' counting the sends since the last claim (a claim clears
# both). The budget bounds both kinds of retry: claims ('tries', counted by CLAIM) and
# consecutive unclaimed sends. 1 = send it, 2 = over budget (the caller ends the stream),
# 0 = leave it.
MARK_REQUEUE = (
    _PRELUDE
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'hb', 'qt', 'rq', 'rqn', 'tries', 'sent', 'miss')
if finished(st[1]) then return 0 end
if not st[1] and not st[4] then
  if not st[8] then
    redis.call('HSET', KEYS[1], 'miss', now)
    redis.call('EXPIRE', KEYS[1], ARGV[3])
    return 0
  end
  if (now - tonumber(st[8])) < tonumber(ARGV[5]) then return 0 end
end
if st[1] == 'running' and st[2] and (now - tonumber(st[2])) < tonumber(ARGV[1]) then return 0 end
local sends = tonumber(st[5] or '0')
if st[4] then
  if (now - tonumber(st[4])) < tonumber(ARGV[6]) * 2 ^ math.max(sends - 1, 0) then return 0 end
elseif st[1] == 'queued' and st[3] then
  local grace = tonumber(ARGV[5])
  if st[7] then grace = tonumber(ARGV[2]) end
  if (now - tonumber(st[3])) < grace then return 0 end
end
if tonumber(st[6] or '0') >= tonumber(ARGV[4]) or sends >= tonumber(ARGV[4]) then return 2 end
redis.call('HSET', KEYS[1], 'rq', now)
redis.call('HINCRBY', KEYS[1], 'rqn', 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# KEYS: state. Record that the web tier handed a new stream's task to the broker (a stream
# committed but never marked sent is sent by the sweeper after a short grace).
MARK_SENT = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('HSET', KEYS[1], 'sent', 1) end
return 1
"""

# KEYS: state, log. ARGV: channel, stale ms, retention, final status, then seq/type/data
# triples. Take over a stream whose writer is dead and end it with the given events (from
# SQL), adding those above the log's last entry. The terminal event must land above the
# log's last entry: if the log has moved past it, nothing changes ('moved'; the caller reads
# the log again).
SEAL = (
    _PRELUDE
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'hb')
if finished(st[1]) then return 'finished' end
if st[1] == 'running' and st[2] and (now - tonumber(st[2])) < tonumber(ARGV[2]) then
  return 'busy'
end
local last = last_seq(KEYS[2])
if tonumber(ARGV[#ARGV - 2]) <= last then return 'moved' end
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

# KEYS: state, log. ARGV: channel, running ttl, task id, detach policy ms (0: continue).
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
redis.call('HDEL', KEYS[1], 'cancel', 'why', 'ew', 'hb', 'rq', 'rqn', 'tries', 'sent', 'qn', 'qs',
           'xt')
if tonumber(ARGV[4] or '0') > 0 then
  redis.call('HSET', KEYS[1], 'dp', ARGV[4])
else
  redis.call('HDEL', KEYS[1], 'dp')
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
publish(ARGV[1], seq, {'resumed'}, {tostring(next_attempt)})
return {'reopened', seq, next_attempt}
"""
)

# KEYS: state. ARGV: channel, the notice as JSON ({"type": "queued", "position": ...}).
# While the stream is queued, keep where it stands in line ('qn', with 'qs': the log's last seq
# then) for viewers that attach later, and publish it to those attached, in one step: a
# stream a worker has claimed meanwhile gets no stale notice. On the live channel a notice is
# an object ({"seq": ..., "notice": ...}); the events' batches are arrays.
QUEUE_NOTICE = """
local st = redis.call('HMGET', KEYS[1], 'status', 'seq')
if st[1] ~= 'queued' then return 0 end
local seq = st[2] or '0'
redis.call('HSET', KEYS[1], 'qn', ARGV[2], 'qs', seq)
redis.call('PUBLISH', ARGV[1], '{"seq":' .. seq .. ',"notice":' .. ARGV[2] .. '}')
return 1
"""

# KEYS: state, viewers. What GET /streams/<id> shows of the detach policy:
# {now ms, policy ms or -1, since ms (no viewer since then) or -1 (watched or unknown)}.
DETACH_STATUS = (
    _PRELUDE
    + """
local dp = tonumber(redis.call('HGET', KEYS[1], 'dp') or '-1')
local since = unwatched_since(KEYS[1], KEYS[2], now) or -1
return {now, dp, since}
"""
)

# KEYS: a user's feed. ARGV: channel, max length, ttl s, the event as JSON without its seq
# (an object with at least one member). Add the event as the feed's next seq (1, 2, ...
# without holes; its JSON gets "seq" as its first member), keep the last max length
# entries, refresh the TTL and publish the event on the channel, in one atomic step.
FEED_APPEND = """
local seq = 1
local e = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if e[1] then seq = tonumber(string.match(e[1][1], '-(%d+)$')) + 1 end
for i = 4, #ARGV do
  if i > 4 then seq = seq + 1 end
  local event = '{"seq":' .. seq .. ',' .. string.sub(ARGV[i], 2)
  redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '0-' .. seq, 'e', event)
  redis.call('PUBLISH', ARGV[1], event)
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return seq
"""


def sharded(script: str) -> str:
    """``script`` with its live-channel publishes made sharded (``SPUBLISH``)."""
    return script.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
