-- Fetch by a plan over one or more queues in one round trip. On a cluster it is called
-- with one queue at a time, since a script may only touch one slot.
-- KEYS: the prelude's 6 keys of each queue, queue after queue, in plan order
-- ARGV[1]: jobs wanted in all; ARGV[2]: lease (ms); ARGV[3]: k, the number of queues;
-- ARGV[4 .. 3+k]: each queue's share; ARGV[4+k .. 3+2k]: each queue's max;
-- ARGV[4+2k .. 3+2k+total]: one fresh token per job wanted;
-- ARGV[4+2k+total]: a, the number of acks that travel with this fetch; then a triples
-- (queue's number in the plan, id, '|' .. token), acked first as ack.lua does
-- Returns: quintuples (queue's number in the plan, id, envelope, meta 'attempt|due|',
--          history JSON or ''), the i-th leased with the i-th token; then k items: ms
--          until each queue's first delayed job is due, or -1; then a items, '1' acked
--          or '0' (see ack_all)
-- Every job is returned as stored, readable or not: the client reads each one and
-- dead-letters with its token one it cannot read, so one corrupt job never holds back
-- the jobs leased with it.
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

-- The acks first: they settle jobs already done, whatever the fetch finds.
local acks_at = 4 + 2 * k + total
local a = tonumber(ARGV[acks_at] or '0')
local acked = {}
if a > 0 then
  local by_queue = {}
  for i = 1, a do
    local at = acks_at + 3 * i - 2
    local q = tonumber(ARGV[at])
    local b = by_queue[q]
    if not b then
      b = {ids = {}, suffixes = {}, slots = {}}
      by_queue[q] = b
    end
    local j = #b.slots + 1
    b.ids[j] = ARGV[at + 1]
    b.suffixes[j] = ARGV[at + 2]
    b.slots[j] = i
  end
  for q, b in pairs(by_queue) do
    local done = ack_all(key(q, 2), key(q, 3), b.ids, b.suffixes)
    for j, slot in ipairs(b.slots) do
      acked[slot] = done[j] == 1 and '1' or '0'
    end
  end
end

-- Take up to n ids from the head of queue q. Per job this does no more than it must:
-- a waiting job's meta always ends in '|' (no token), so leasing it is one
-- concatenation, and the client parses the meta it is sent.
local n_out = 0
local function take(q, n)
  local c = 0
  local q_text = tostring(q)
  while c < n do
    local ids = redis.call('LPOP', key(q, 1), math.min(n - c, SLICE / 3))
    if not ids then
      break
    end
    local fields = {}
    for i, id in ipairs(ids) do
      fields[3 * i - 2] = e(id)
      fields[3 * i - 1] = m(id)
      fields[3 * i] = h(id)
    end
    local vals = redis.call('HMGET', key(q, 3), unpack(fields))
    local deadlines, metas, d = {}, {}, 0
    for i, id in ipairs(ids) do
      local env = vals[3 * i - 2]
      -- An id whose job is gone (never expected) is skipped.
      if env then
        c = c + 1
        taken = taken + 1
        local token = ARGV[3 + 2 * k + taken]
        local meta = vals[3 * i - 1]
        if not meta or string.byte(meta, -1) ~= 124 then
          local attempt, due = parse_meta(meta)
          meta = attempt .. '|' .. due .. '|'
        end
        d = d + 2
        deadlines[d - 1] = deadline
        deadlines[d] = id
        metas[d - 1] = fields[3 * i - 1]
        metas[d] = meta .. token
        out[n_out + 1] = q_text
        out[n_out + 2] = id
        out[n_out + 3] = env
        out[n_out + 4] = meta
        out[n_out + 5] = vals[3 * i] or ''
        n_out = n_out + 5
      end
    end
    if d > 0 then
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
    out[n_out + q] = tostring(math.max(0, tonumber(firsts[q]) - now))
  else
    out[n_out + q] = '-1'
  end
end
for i = 1, a do
  out[n_out + k + i] = acked[i]
end
return out
