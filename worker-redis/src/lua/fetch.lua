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

local function take(q, n)
  local c = 0
  while c < n do
    local ids = redis.call('LPOP', key(q, 1), n - c)
    if not ids then
      break
    end
    for _, id in ipairs(ids) do
      local env = redis.call('HGET', key(q, 4), id)
      if env then
        c = c + 1
        taken = taken + 1
        local token = ARGV[3 + 2 * k + taken]
        redis.call('ZADD', key(q, 2), now + lease, id)
        redis.call('HSET', key(q, 3), id, token)
        out[#out + 1] = id
        out[#out + 1] = env
        out[#out + 1] = redis.call('HGET', key(q, 6), id) or '1'
        out[#out + 1] = redis.call('HGET', key(q, 7), id) or ''
        out[#out + 1] = redis.call('HGET', key(q, 8), id) or '0'
        out[#out + 1] = token
      end
    end
  end
  return c
end

for q = 1, k do
  local due = redis.call('ZRANGEBYSCORE', key(q, 5), '-inf', now, 'LIMIT', 0, 1000)
  for _, id in ipairs(due) do
    redis.call('ZREM', key(q, 5), id)
    redis.call('RPUSH', key(q, 1), id)
  end
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
  local first = redis.call('ZRANGE', key(q, 5), 0, 0, 'WITHSCORES')
  if first[2] then
    out[#out + 1] = tostring(math.max(0, tonumber(first[2]) - now))
  else
    out[#out + 1] = '-1'
  end
end
return out
