-- Fetch by a plan over one or more queues in one round trip. On a cluster it is called
-- with one queue at a time, since a script may only touch one slot.
-- KEYS: the prelude's 11 keys of each queue, queue after queue, in plan order
-- ARGV[1]: jobs wanted in all; ARGV[2]: lease (ms); ARGV[3]: k, the number of queues;
-- ARGV[4 .. 3+k]: each queue's share; ARGV[4+k .. 3+2k]: each queue's max;
-- ARGV[4+2k ..]: one fresh token per job wanted
-- Returns: sextuples as fetch.lua, then k items: ms until each queue's first delayed
--          job is due, or -1
-- Invariant: each queue gives up to its share first; then, in plan order, queues that
-- filled their share top up to their max until the total is reached (work-conserving).
local now = now_ms()
local total, lease, k = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function key(q, i)
  return KEYS[(q - 1) * 11 + i]
end
local out, taken, got = {}, 0, {}

-- Take up to n ids from the head of queue q: a fixed handful of commands per slice,
-- whatever the slice's size.
local function take(q, n)
  local c = 0
  while c < n do
    local ids = redis.call('LPOP', key(q, 1), math.min(n - c, SLICE))
    if not ids then
      break
    end
    local envs = redis.call('HMGET', key(q, 4), unpack(ids))
    local live = {}
    for i, id in ipairs(ids) do
      if envs[i] then
        live[#live + 1] = id
      end
    end
    if #live > 0 then
      local attempts = redis.call('HMGET', key(q, 6), unpack(live))
      local history = redis.call('HMGET', key(q, 7), unpack(live))
      local due = redis.call('HMGET', key(q, 8), unpack(live))
      local deadlines, tokens = {}, {}
      -- Formatted once: Lua turns each number argument into text, which is costly.
      local deadline = tostring(now + lease)
      local j = 0
      for i, id in ipairs(ids) do
        if envs[i] then
          j = j + 1
          taken = taken + 1
          local token = ARGV[3 + 2 * k + taken]
          deadlines[#deadlines + 1] = deadline
          deadlines[#deadlines + 1] = id
          tokens[#tokens + 1] = id
          tokens[#tokens + 1] = token
          out[#out + 1] = id
          out[#out + 1] = envs[i]
          out[#out + 1] = attempts[j] or '1'
          out[#out + 1] = history[j] or ''
          out[#out + 1] = due[j] or '0'
          out[#out + 1] = token
        end
      end
      redis.call('ZADD', key(q, 2), unpack(deadlines))
      redis.call('HSET', key(q, 3), unpack(tokens))
      c = c + #live
    end
  end
  return c
end

-- The earliest delayed job of each queue (promoted ones are looked up again at the end).
local firsts = {}
for q = 1, k do
  local first = redis.call('ZRANGE', key(q, 5), 0, 0, 'WITHSCORES')
  if first[2] and tonumber(first[2]) <= now then
    local due = redis.call('ZRANGEBYSCORE', key(q, 5), '-inf', now, 'LIMIT', 0, 1000)
    redis.call('ZREM', key(q, 5), unpack(due))
    redis.call('RPUSH', key(q, 1), unpack(due))
    first = redis.call('ZRANGE', key(q, 5), 0, 0, 'WITHSCORES')
  end
  firsts[q] = first[2]
  got[q] = take(q, math.min(tonumber(ARGV[3 + q]), total - taken))
end
for q = 1, k do
  if taken >= total then
    break
  end
  if got[q] >= tonumber(ARGV[3 + q]) then
    local room = math.min(tonumber(ARGV[3 + k + q]) - got[q], total - taken)
    if room > 0 then
      got[q] = got[q] + take(q, room)
    end
  end
end
for q = 1, k do
  if firsts[q] then
    out[#out + 1] = tostring(math.max(0, tonumber(firsts[q]) - now))
  else
    out[#out + 1] = '-1'
  end
end
return out
