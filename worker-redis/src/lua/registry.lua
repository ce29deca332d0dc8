-- The worker registry (not a queue script; no prelude keys).
-- KEYS[1]: index ZSET worker id -> expiry (ms); KEYS[2]: info HASH worker id -> JSON
-- ARGV[1]: 'beat' | 'list' | 'leave'; for beat: ARGV[2] id, ARGV[3] JSON, ARGV[4] ttl (ms);
--          for leave: ARGV[2] id
-- Returns: for list, the JSON of every live worker; otherwise 1
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]
if op == 'beat' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  return 1
elseif op == 'leave' then
  redis.call('ZREM', KEYS[1], ARGV[2])
  redis.call('HDEL', KEYS[2], ARGV[2])
  return 1
end
-- list: expire the silent ones first
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(gone) do
  redis.call('HDEL', KEYS[2], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('HVALS', KEYS[2])
