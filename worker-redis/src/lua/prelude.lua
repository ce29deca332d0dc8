-- Shared by every queue script. KEYS are always the queue's keys in this order (all
-- share one hash tag, so a queue lives on one cluster slot):
--   1 pending LIST of ids            2 inflight ZSET id -> lease deadline (ms)
--   3 jobs HASH, three fields a job: 'e:'..id -> envelope (immutable JSON),
--     'm:'..id -> 'attempt|due|token' (due: ms it became or becomes ready; token empty
--     when not leased), 'h:'..id -> history (JSON array, absent before a failure)
--   4 delayed ZSET id -> due (ms)    5 dead ZSET id -> died at (ms)
--   6 dead HASH: the jobs fields of each dead job, plus 'r:'..id -> reason
-- One hash for a job's state keeps each step to a few commands, whatever the batch.
-- Time is the Redis server's clock, so leases do not depend on worker clocks.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function e(id) return 'e:' .. id end
local function m(id) return 'm:' .. id end
local function h(id) return 'h:' .. id end
local function r(id) return 'r:' .. id end

-- attempt, due, token (strings) of a meta value; defaults for a missing one.
local function parse_meta(v)
  if not v then
    return '1', '0', ''
  end
  local a, d, t = string.match(v, '^(%d+)|(%d+)|(%d*)$')
  return a or '1', d or '0', t or ''
end

local function meta_of(id)
  return parse_meta(redis.call('HGET', KEYS[3], m(id)))
end

local function set_meta(id, attempt, due, token)
  redis.call('HSET', KEYS[3], m(id), attempt .. '|' .. due .. '|' .. token)
end

-- A leased job's meta ends in exactly '|' .. token: `suffix` is that, sent by the
-- worker, so no meta is parsed to check it.
local function leased_by(meta, suffix)
  return meta and #suffix > 1 and string.sub(meta, -#suffix) == suffix
end

-- Invariant: only the delivery holding the current token may change an in-flight job.
local function owned(id, token)
  return leased_by(redis.call('HGET', KEYS[3], m(id)), '|' .. token)
end

local function append_history(id, attempt, err, now)
  local rec = cjson.encode({attempt = tonumber(attempt), error = err, at_ms = now})
  local old = redis.call('HGET', KEYS[3], h(id))
  if old then
    old = string.sub(old, 1, -2) .. ',' .. rec .. ']'
  else
    old = '[' .. rec .. ']'
  end
  redis.call('HSET', KEYS[3], h(id), old)
end

-- Commands taking many arguments are sent in slices, so a large batch never
-- exceeds what one Lua call may unpack.
local SLICE = 999

-- `cmd key list...`, in slices (SLICE is a multiple of 3 and of 1, not of 2: callers
-- with pairs use chunked_pairs).
local function chunked(cmd, key, list, step)
  step = step or SLICE
  for i = 1, #list, step do
    redis.call(cmd, key, unpack(list, i, math.min(i + step - 1, #list)))
  end
end

local function chunked_pairs(cmd, key, list)
  chunked(cmd, key, list, 1000)
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

-- Ack deliveries of one queue: ids[i], leased with the token whose '|' .. token is
-- suffixes[i] (a leased job's meta ends in exactly that).
-- Returns one integer per delivery, in order: 1 when acked (the job is gone), 0 when
-- the token does not own it (or the delivery repeats an earlier one).
-- Cost: three commands, whatever the number.
local function ack_all(inflight, jobs, ids, suffixes)
  local fields = {}
  for i, id in ipairs(ids) do
    fields[i] = m(id)
  end
  local metas = hmget_all(jobs, fields)
  local out, gone, drop, seen, g = {}, {}, {}, {}, 0
  for i, id in ipairs(ids) do
    if leased_by(metas[i], suffixes[i]) and not seen[id] then
      seen[id] = true
      out[i] = 1
      g = g + 1
      gone[g] = id
      drop[3 * g - 2] = e(id)
      drop[3 * g - 1] = fields[i]
      drop[3 * g] = h(id)
    else
      out[i] = 0
    end
  end
  if g > 0 then
    chunked('ZREM', inflight, gone)
    chunked('HDEL', jobs, drop)
  end
  return out
end
