-- ARGV[1]: channel; ARGV[2..]: ids (none: every dead letter)
-- Returns: how many went back to pending, attempt reset to 1, history kept
local ids = {}
if #ARGV > 1 then
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGE', KEYS[9], 0, -1)
end
local now = now_ms()
local moved = 0
for _, id in ipairs(ids) do
  local env = redis.call('HGET', KEYS[10], id)
  if redis.call('ZREM', KEYS[9], id) == 1 and env then
    redis.call('HSET', KEYS[4], id, env)
    redis.call('HDEL', KEYS[10], id)
    redis.call('HDEL', KEYS[11], id)
    redis.call('HSET', KEYS[6], id, 1)
    redis.call('HSET', KEYS[8], id, now)
    redis.call('RPUSH', KEYS[1], id)
    moved = moved + 1
  end
end
if moved > 0 then
  redis.call('PUBLISH', ARGV[1], moved)
end
return moved
