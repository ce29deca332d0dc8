-- ARGV[1]: id; ARGV[2]: token
-- Returns: 1 when acked (the job is gone), 0 when the token does not own it
if not owned(ARGV[1], ARGV[2]) then
  return 0
end
local id = ARGV[1]
drop_lease(id)
for k = 4, 8 do
  if k ~= 5 then
    redis.call('HDEL', KEYS[k], id)
  end
end
return 1
