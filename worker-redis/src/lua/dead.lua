-- ARGV[1]: id; ARGV[2]: token; ARGV[3]: reason
-- Returns: 1 when dead-lettered (envelope, reason and history kept), 0 when the token
-- does not own it, 2 when a dead letter of the id is already stored (nothing changed)
-- Invariant: a dead letter is never overwritten. Enqueue refuses a dead id, so only
-- keys written by something else can hold one here.
if not owned(ARGV[1], ARGV[2]) then
  return 0
end
local id = ARGV[1]
if redis.call('ZSCORE', KEYS[5], id) then
  return 2
end
local now = now_ms()
redis.call('ZREM', KEYS[2], id)
local attempt, due = meta_of(id)
append_history(id, attempt, ARGV[3], now)
set_meta(id, attempt, due, '')
local vals = redis.call('HMGET', KEYS[3], e(id), m(id), h(id))
redis.call('HDEL', KEYS[3], e(id), m(id), h(id))
local fields = {r(id), ARGV[3]}
for i, f in ipairs({e(id), m(id), h(id)}) do
  if vals[i] then
    fields[#fields + 1] = f
    fields[#fields + 1] = vals[i]
  end
end
redis.call('HSET', KEYS[6], unpack(fields))
redis.call('ZADD', KEYS[5], now, id)
return 1
