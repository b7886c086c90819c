"""The Lua scripts of the Redis budget store: each decision is one script run, atomic on
the server (one round trip), so concurrent processes never overspend.

A scope's counters are five keys sharing one hash tag: the lifetime totals (a hash:
``calls``, ``in``, ``out``, ``cost``, ``estimated``), the rolling window's calls, tokens
and cost (hashes of time bucket -> amount: 60 buckets a window, timed by the server's
clock), and the set of reservations in flight. The limit rules are the memory store's
(``callpolicy._budget_memory``), applied here on the server.
"""

from __future__ import annotations

__all__ = ["RECORD", "RESERVE", "SETTLE", "TALLY"]

# Shared by every script. Amounts arrive as ARGV strings and are handed to HINCRBY as
# they came where they can be: a Lua number is a double, exact only below 2**53.
_COUNTERS = """
local function window_sums(window)
  local width = math.ceil(window / 60)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local current = math.floor(now / width)
  local oldest = current - 60
  local sums = {0, 0, 0}
  for i, name in ipairs({KEYS[2], KEYS[3], KEYS[4]}) do
    local all = redis.call('HGETALL', name)
    for j = 1, #all, 2 do
      local b = tonumber(all[j])
      if b <= oldest then
        redis.call('HDEL', name, all[j])
      else
        sums[i] = sums[i] + tonumber(all[j + 1])
      end
    end
  end
  return sums, current, oldest
end
local function add_totals(calls, tokens_in, tokens_out, cost)
  if tonumber(calls) ~= 0 then redis.call('HINCRBY', KEYS[1], 'calls', calls) end
  redis.call('HINCRBY', KEYS[1], 'in', tokens_in)
  redis.call('HINCRBY', KEYS[1], 'out', tokens_out)
  redis.call('HINCRBY', KEYS[1], 'cost', cost)
end
local function add_window(bucket, calls, tokens, cost)
  if tonumber(calls) ~= 0 then redis.call('HINCRBY', KEYS[2], bucket, calls) end
  redis.call('HINCRBY', KEYS[3], bucket, tokens)
  redis.call('HINCRBY', KEYS[4], bucket, cost)
end
local function touch(count, ttl_ms)
  for i = 1, count do redis.call('PEXPIRE', KEYS[i], ttl_ms) end
end
"""

# KEYS: counters, window calls, window tokens, window cost, pending set
# ARGV: max_calls, max_tokens, max_cost (-1: none), window_ms (0: none), in, out, cost,
#       ttl_ms, reservation id
# -> {1, bucket} or {0, kind, consumed, limit, requested (-1: none)}
RESERVE = (
    _COUNTERS
    + """
local c = redis.call('HMGET', KEYS[1], 'calls', 'in', 'out', 'cost')
local calls = tonumber(c[1] or '0')
local tokens = tonumber(c[2] or '0') + tonumber(c[3] or '0')
local cost = tonumber(c[4] or '0')
local window = tonumber(ARGV[4])
local bucket = 0
if window > 0 then
  local sums
  sums, bucket = window_sums(window)
  calls, tokens, cost = sums[1], sums[2], sums[3]
end
local want_tokens = tonumber(ARGV[5]) + tonumber(ARGV[6])
local want_cost = tonumber(ARGV[7])
local max_calls, max_tokens, max_cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if max_calls >= 0 and calls + 1 > max_calls then return {0, 'calls', calls, max_calls, -1} end
if max_tokens >= 0 and (tokens >= max_tokens or tokens + want_tokens > max_tokens) then
  local asked = -1
  if tokens < max_tokens then asked = want_tokens end
  return {0, 'tokens', tokens, max_tokens, asked}
end
if max_cost >= 0 and (cost >= max_cost or cost + want_cost > max_cost) then
  local asked = -1
  if cost < max_cost then asked = want_cost end
  return {0, 'cost', cost, max_cost, asked}
end
add_totals(1, ARGV[5], ARGV[6], ARGV[7])
redis.call('SADD', KEYS[5], ARGV[9])
if window > 0 then add_window(bucket, 1, want_tokens, want_cost) end
touch(5, ARGV[8])
return {1, bucket}
"""
)

# KEYS: as RESERVE. ARGV: reservation id, d_in, d_out, d_cost, estimated, refund, bucket,
#       window_ms, ttl_ms, actual tokens, actual cost -> 1 settled, 0 already settled
SETTLE = (
    _COUNTERS
    + """
if redis.call('SREM', KEYS[5], ARGV[1]) == 0 then return 0 end
local refund = 0
if ARGV[6] == '1' then refund = -1 end
add_totals(refund, ARGV[2], ARGV[3], ARGV[4])
if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[1], 'estimated', 1) end
local window = tonumber(ARGV[8])
if window > 0 then
  local _, current, oldest = window_sums(window)
  local bucket = tonumber(ARGV[7])
  if bucket > oldest then
    add_window(bucket, refund, tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[4])
  else
    -- the call outlived the window its start fell in: what it used counts now
    add_window(current, 0, ARGV[10], ARGV[11])
  end
end
touch(5, ARGV[9])
return 1
"""
)

# KEYS: as RESERVE. ARGV: calls, in, out, cost, window_ms, ttl_ms, estimated (1/0)
RECORD = (
    _COUNTERS
    + """
add_totals(ARGV[1], ARGV[2], ARGV[3], ARGV[4])
if ARGV[7] == '1' then redis.call('HINCRBY', KEYS[1], 'estimated', 1) end
local window = tonumber(ARGV[5])
if window > 0 then
  local _, current = window_sums(window)
  add_window(current, ARGV[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[4])
end
touch(4, ARGV[6])
return 1
"""
)

# KEYS: as RESERVE. ARGV: window_ms -> {calls, in, out, cost, estimated, in flight, w calls,
#       w tokens, w cost}
TALLY = (
    _COUNTERS
    + """
local c = redis.call('HMGET', KEYS[1], 'calls', 'in', 'out', 'cost', 'estimated')
local out = {}
for i = 1, 5 do out[i] = tonumber(c[i] or '0') end
out[6] = redis.call('SCARD', KEYS[5])
local window = tonumber(ARGV[1])
if window > 0 then
  local sums = window_sums(window)
  out[7], out[8], out[9] = sums[1], sums[2], sums[3]
else
  out[7], out[8], out[9] = -1, -1, -1
end
return out
"""
)
