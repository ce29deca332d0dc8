-- ARGV[1]: id; ARGV[2]: token; ARGV[3]: channel
-- Returns: 1 when released to the head of pending (attempt unchanged), 0 when the token
-- does not own it
if not owned(ARGV[1], ARGV[2]) then
  return 0
end
drop_lease(ARGV[1])
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[3], 1)
return 1
