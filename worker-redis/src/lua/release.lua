-- ARGV[1]: id; ARGV[2]: token; ARGV[3]: channel
-- Returns: 1 when released to the head of pending (attempt unchanged), 0 when the token
-- does not own it
if not owned(ARGV[1], ARGV[2]) then
  return 0
end
local id = ARGV[1]
redis.call('ZREM', KEYS[2], id)
local attempt, due = meta_of(id)
set_meta(id, attempt, due, '')
redis.call('LPUSH', KEYS[1], id)
redis.call('PUBLISH', ARGV[3], 1)
return 1
