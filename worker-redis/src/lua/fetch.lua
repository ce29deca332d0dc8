-- Fetch by a plan over one or more queues in one round trip. On a cluster it is called
-- with one queue at a time, since a script may only touch one slot.
-- KEYS: the prelude's 6 keys of each queue, queue after queue, in plan order
-- ARGV[1]: jobs wanted in all; ARGV[2]: lease (ms); ARGV[3]: k, the number of queues;
-- ARGV[4 .. 3+k]: each queue's share; ARGV[4+k .. 3+2k]: each queue's max;
-- ARGV[4+2k ..]: one fresh token per job wanted
-- Returns: sextuples (id, envelope, attempt, history JSON or '', due ms, token), then k
--          items: ms until each queue's first delayed job is due, or -1
-- Invariant: each queue gives up to its share first; then, in plan order, queues that
-- filled their share top up to their max until the total is reached (work-conserving).
-- Cost: two commands, then four per queue and slice of up to 333 jobs.
local now = now_ms()
local total, lease, k = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function key(q, i)
  return KEYS[(q - 1) * 6 + i]
end
local out, taken, got = {}, 0, {}
-- Formatted once: Lua turns each number into text, which is costly.
local deadline = tostring(now + lease)

-- Take up to n ids from the head of queue q.
local function take(q, n)
  local c = 0
  while c < n do
    local ids = redis.call('LPOP', key(q, 1), math.min(n - c, SLICE / 3))
    if not ids then
      break
    end
    local fields = {}
    for _, id in ipairs(ids) do
      fields[#fields + 1] = e(id)
      fields[#fields + 1] = m(id)
      fields[#fields + 1] = h(id)
    end
    local vals = redis.call('HMGET', key(q, 3), unpack(fields))
    local deadlines, metas = {}, {}
    for i, id in ipairs(ids) do
      local env = vals[3 * i - 2]
      -- An id whose job is gone (never expected) is skipped.
      if env then
        c = c + 1
        taken = taken + 1
        local token = ARGV[3 + 2 * k + taken]
        local attempt, due = parse_meta(vals[3 * i - 1])
        deadlines[#deadlines + 1] = deadline
        deadlines[#deadlines + 1] = id
        metas[#metas + 1] = m(id)
        metas[#metas + 1] = attempt .. '|' .. due .. '|' .. token
        out[#out + 1] = id
        out[#out + 1] = env
        out[#out + 1] = attempt
        out[#out + 1] = vals[3 * i] or ''
        out[#out + 1] = due
        out[#out + 1] = token
      end
    end
    if #deadlines > 0 then
      redis.call('ZADD', key(q, 2), unpack(deadlines))
      redis.call('HSET', key(q, 3), unpack(metas))
    end
  end
  return c
end

-- The earliest delayed job of each queue (looked up again after a promotion).
local firsts = {}
for q = 1, k do
  local first = redis.call('ZRANGE', key(q, 4), 0, 0, 'WITHSCORES')
  if first[2] and tonumber(first[2]) <= now then
    local due = redis.call('ZRANGEBYSCORE', key(q, 4), '-inf', now, 'LIMIT', 0, 1000)
    redis.call('ZREM', key(q, 4), unpack(due))
    redis.call('RPUSH', key(q, 1), unpack(due))
    first = redis.call('ZRANGE', key(q, 4), 0, 0, 'WITHSCORES')
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
