-- ARGV[1]: id; ARGV[2]: token; ARGV[3]: lease (ms)
-- Returns: 1 when the deadline is now + lease, 0 when the token does not own the job
if not owned(ARGV[1], ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[2], 'XX', now_ms() + tonumber(ARGV[3]), ARGV[1])
return 1
