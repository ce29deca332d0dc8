-- Enqueue the jobs of several callers at once, each caller's jobs all or nothing.
-- ARGV[1]: notify channel; ARGV[2]: g, the number of callers; ARGV[3 .. 2+g]: each
-- caller's number of jobs; then, caller after caller, triples of id, envelope JSON,
-- delay (ms)
-- Returns: one item per caller, in order: '' when its jobs were written, else the id
--          that the queue already holds, live or dead (nothing of that caller's written)
-- Invariant: an id names one job of the queue from its enqueue until that job is acked
-- or its dead letter purged, so an id that is live or dead is refused; callers are
-- taken in order, so a later caller's duplicate of an earlier caller's id is refused.
-- Cost: six commands per batch, whatever its size.
local g = tonumber(ARGV[2])
local first = 3 + g
local ids = {}
for i = first, #ARGV, 3 do
  ids[#ids + 1] = 'e:' .. ARGV[i]
end
local live = hmget_all(KEYS[3], ids)
-- A dead letter keeps its envelope field under the same name in the dead hash.
local dead = hmget_all(KEYS[6], ids)
local now = now_ms()
-- Formatted once: Lua turns each number into text, which is costly.
local now_text = tostring(now)
local seen, out = {}, {}
local writes, ready, delayed = {}, {}, {}
local job = 0
for c = 1, g do
  local n = tonumber(ARGV[2 + c])
  local from = job
  local dup = nil
  local mine = {}
  for j = from + 1, from + n do
    local id = ARGV[first + 3 * (j - 1)]
    if seen[id] or mine[id] or live[j] or dead[j] then
      dup = id
      break
    end
    mine[id] = true
  end
  if dup then
    out[c] = dup
  else
    out[c] = ''
    for j = from + 1, from + n do
      local at = first + 3 * (j - 1)
      local id, delay = ARGV[at], tonumber(ARGV[at + 2])
      seen[id] = true
      local due = now_text
      if delay > 0 then
        due = tostring(now + delay)
        delayed[#delayed + 1] = due
        delayed[#delayed + 1] = id
      else
        ready[#ready + 1] = id
      end
      writes[#writes + 1] = e(id)
      writes[#writes + 1] = ARGV[at + 1]
      writes[#writes + 1] = m(id)
      writes[#writes + 1] = '1|' .. due .. '|'
    end
  end
  job = from + n
end
chunked_pairs('HSET', KEYS[3], writes)
chunked_pairs('ZADD', KEYS[4], delayed)
chunked('RPUSH', KEYS[1], ready)
if #ready > 0 then
  redis.call('PUBLISH', ARGV[1], #ready)
end
return out
