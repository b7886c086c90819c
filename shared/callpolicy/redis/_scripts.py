"""Lua scripts: each breaker decision is one atomic script run on the Redis server.

Time is the server's (``TIME``), in milliseconds, so hosts with skewed clocks agree.
Keys of one circuit: ``KEYS[1]`` a hash of its state, ``KEYS[2]`` a sorted set of probe
leases (member: permit id, score: lease end), ``KEYS[3]`` the failure-rate window (list).
Probe slots are leases rather than a counter, so a probe whose process died frees its
slot when the lease ends: the circuit can never wedge. The hash's ``reason`` field is the
reason of the trip that opened the circuit (``threshold``, ``failure_rate``,
``probe_failed``, ``manual``); it is absent while closed and in hashes written before the
field existed.
"""

from __future__ import annotations

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'state', 'gen', 'failures', 'open_until', 'hold',
                     'ctrips', 'trips', 'psucc')
local state = h[1] or 'closed'
local gen = tonumber(h[2] or '0')
local failures = tonumber(h[3] or '0')
local open_until = tonumber(h[4] or '0')
local hold = h[5] == '1'
local ctrips = tonumber(h[6] or '0')
local trips = tonumber(h[7] or '0')
local psucc = tonumber(h[8] or '0')
"""

# ARGV: max_probes, lease_ms, ttl_ms, permit_id
# -> {decision (0 refused, 1 admitted, 2 probe), gen, failures, retry_in_ms (-1: held),
#     old state when this call moved the circuit to half-open else ''}
#    and, when refused only (a 6th element), the reason of the trip that opened the
#    circuit ('' if unknown). Admissions keep 5 elements: the hot path's reply is unchanged.
ADMIT = (
    _PRELUDE
    + """
if state == 'closed' then return {1, gen, failures, 0, ''} end
local moved = ''
local function refused(retry_in)
  return {0, gen, failures, retry_in, moved, redis.call('HGET', KEYS[1], 'reason') or ''}
end
if state == 'open' then
  if hold then return refused(-1) end
  if now < open_until then return refused(open_until - now) end
  gen = gen + 1
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'gen', gen, 'psucc', 0)
  redis.call('DEL', KEYS[2])
  moved = 'open'
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return refused(0) end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {2, gen, failures, 0, moved}
"""
)

# ARGV: gen, probe (0/1), outcome (s/f/i), permit_id, failure_threshold, cooldown_ms,
#       success_threshold, rate (0: off), window_size, minimum_calls, multiplier,
#       max_cooldown_ms (the cap: max_cooldown, else ten years), ttl_ms
# -> {state after, old state if a transition happened else '', reason, failures, cooldown_ms}
RECORD = (
    _PRELUDE
    + """
local ttl = ARGV[13]
local function touch()
  redis.call('PEXPIRE', KEYS[1], ttl)
end
local function trip(reason)
  ctrips = ctrips + 1
  trips = trips + 1
  local cd, m, cap = tonumber(ARGV[6]), tonumber(ARGV[11]), tonumber(ARGV[12])
  if m > 1 and cap > cd then  -- grown at most to the cap: never a power past it
    cd = cd * m ^ math.min(ctrips - 1, math.ceil(math.log(cap / cd) / math.log(m)))
  end
  if cd > cap then cd = cap end
  cd = math.floor(cd)
  redis.call('HSET', KEYS[1], 'state', 'open', 'gen', gen + 1, 'failures', failures,
             'open_until', now + cd, 'ctrips', ctrips, 'trips', trips, 'psucc', 0,
             'reason', reason)
  redis.call('DEL', KEYS[2], KEYS[3])
  touch()
  return {'open', state, reason, failures, cd}
end
local function close(reason)
  redis.call('HSET', KEYS[1], 'state', 'closed', 'gen', gen + 1, 'failures', 0,
             'ctrips', 0, 'psucc', 0)
  redis.call('HDEL', KEYS[1], 'reason')
  redis.call('DEL', KEYS[2], KEYS[3])
  touch()
  return {'closed', state, reason, 0, 0}
end
if tonumber(ARGV[1]) ~= gen then return {state, '', '', failures, 0} end
local outcome = ARGV[3]
if ARGV[2] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[4])
  if outcome == 's' then
    psucc = psucc + 1
    if psucc >= tonumber(ARGV[7]) then return close('probe_succeeded') end
    redis.call('HSET', KEYS[1], 'psucc', psucc)
  elseif outcome == 'f' then
    failures = failures + 1
    return trip('probe_failed')
  end
  touch()
  return {state, '', '', failures, 0}
end
if state ~= 'closed' or hold then return {state, '', '', failures, 0} end
local rate = tonumber(ARGV[8])
if outcome == 's' then
  if failures ~= 0 then redis.call('HSET', KEYS[1], 'failures', 0) end
  if rate > 0 then
    redis.call('LPUSH', KEYS[3], 0)
    redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[9]) - 1)
    redis.call('PEXPIRE', KEYS[3], ttl)
  end
  if failures ~= 0 or rate > 0 then touch() end
  return {state, '', '', 0, 0}
end
if outcome ~= 'f' then return {state, '', '', failures, 0} end
failures = failures + 1
if failures >= tonumber(ARGV[5]) then return trip('threshold') end
redis.call('HSET', KEYS[1], 'failures', failures)
if rate > 0 then
  redis.call('LPUSH', KEYS[3], 1)
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[9]) - 1)
  redis.call('PEXPIRE', KEYS[3], ttl)
  local window = redis.call('LRANGE', KEYS[3], 0, -1)
  local n, bad = #window, 0
  for _, v in ipairs(window) do if v == '1' then bad = bad + 1 end end
  if n >= tonumber(ARGV[10]) and bad >= rate * n then return trip('failure_rate') end
end
touch()
return {state, '', '', failures, 0}
"""
)

# -> {state, failures, retry_in_ms (-1: none), trips, probes, hold, window_calls, window_fails,
#     reason of the last trip ('' if none: closed, or written before reasons were kept)}
SNAPSHOT = (
    _PRELUDE
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local retry_in = -1
if state == 'open' and not hold then
  retry_in = open_until - now
  if retry_in < 0 then retry_in = 0 end
elseif state == 'half_open' then retry_in = 0 end
local window = redis.call('LRANGE', KEYS[3], 0, -1)
local bad = 0
for _, v in ipairs(window) do if v == '1' then bad = bad + 1 end end
return {state, failures, retry_in, trips, redis.call('ZCARD', KEYS[2]), hold and 1 or 0,
        #window, bad, redis.call('HGET', KEYS[1], 'reason') or ''}
"""
)

# ARGV: target ('closed' | 'open'), hold (0/1), cooldown_ms, ttl_ms
# -> {old state, failures, cooldown_ms}
FORCE = (
    _PRELUDE
    + """
local target = ARGV[1]
if target == 'closed' then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'gen', gen + 1, 'failures', 0, 'ctrips', 0,
             'psucc', 0, 'hold', ARGV[2])
  redis.call('HDEL', KEYS[1], 'reason')
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {state, 0, 0}
end
local cd = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'state', 'open', 'gen', gen + 1, 'open_until', now + cd,
           'ctrips', ctrips + 1, 'trips', trips + 1, 'psucc', 0, 'hold', ARGV[2],
           'reason', 'manual')
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {state, failures, cd}
"""
)
