-- Shared by every queue script. KEYS are always the queue's keys in this order
-- (all share one hash tag, so a queue lives on one cluster slot):
--   1 pending LIST of ids          2 inflight ZSET id -> lease deadline (ms)
--   3 tokens HASH id -> lease token 4 jobs HASH id -> envelope (immutable JSON)
--   5 delayed ZSET id -> due (ms)   6 attempts HASH id -> attempt number
--   7 history HASH id -> JSON array 8 due HASH id -> ms it became (or becomes) ready
--   9 dead ZSET id -> died at (ms)  10 dead_env HASH id -> envelope
--   11 dead_reason HASH id -> reason
-- Time is the Redis server's clock, so leases do not depend on worker clocks.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Invariant: only the delivery holding the current token may change an in-flight job.
local function owned(id, token)
  return redis.call('HGET', KEYS[3], id) == token
end

local function drop_lease(id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end

local function attempt_of(id)
  return tonumber(redis.call('HGET', KEYS[6], id) or '1')
end

local function append_history(id, attempt, err, now)
  local rec = cjson.encode({attempt = attempt, error = err, at_ms = now})
  local h = redis.call('HGET', KEYS[7], id)
  if h then
    h = string.sub(h, 1, -2) .. ',' .. rec .. ']'
  else
    h = '[' .. rec .. ']'
  end
  redis.call('HSET', KEYS[7], id, h)
end

-- Commands taking many arguments are sent in slices, so a large batch never
-- exceeds what one Lua call may unpack.
local SLICE = 1000

-- `cmd key list...`, in slices (SLICE is even, so pairs stay whole).
local function chunked(cmd, key, list)
  for i = 1, #list, SLICE do
    redis.call(cmd, key, unpack(list, i, math.min(i + SLICE - 1, #list)))
  end
end

-- HMGET of every field of `fields`, in slices; false for a missing field.
local function hmget_all(key, fields)
  local out = {}
  for i = 1, #fields, SLICE do
    local part = redis.call('HMGET', key, unpack(fields, i, math.min(i + SLICE - 1, #fields)))
    for _, v in ipairs(part) do
      out[#out + 1] = v
    end
  end
  return out
end
