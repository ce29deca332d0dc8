-- ARGV[1]: channel; ARGV[2..]: ids (none: every dead letter)
-- Returns: how many went back to pending, attempt reset to 1, history kept
-- Invariant: no two live copies of an id: a dead letter whose id is live (pending,
-- delayed or in flight) is skipped, left dead and not counted, so the live job's
-- envelope, meta and lease are untouched.
local ids = {}
if #ARGV > 1 then
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGE', KEYS[5], 0, -1)
end
local now = tostring(now_ms())
local moved = 0
for _, id in ipairs(ids) do
  if redis.call('HEXISTS', KEYS[3], e(id)) == 0 then
    local vals = redis.call('HMGET', KEYS[6], e(id), h(id))
    if redis.call('ZREM', KEYS[5], id) == 1 and vals[1] then
      redis.call('HDEL', KEYS[6], e(id), r(id), m(id), h(id))
      redis.call('HSET', KEYS[3], e(id), vals[1], m(id), '1|' .. now .. '|')
      if vals[2] then
        redis.call('HSET', KEYS[3], h(id), vals[2])
      end
      redis.call('RPUSH', KEYS[1], id)
      moved = moved + 1
    end
  end
end
if moved > 0 then
  redis.call('PUBLISH', ARGV[1], moved)
end
return moved
