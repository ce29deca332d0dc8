-- ARGV[1]: most to return
-- Returns: flat list of sextuples, oldest first: id, envelope, reason, attempt,
--          history JSON ('' if none), died at (ms)
local rows = redis.call('ZRANGE', KEYS[9], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local out = {}
for i = 1, #rows, 2 do
  local id = rows[i]
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[10], id) or ''
  out[#out + 1] = redis.call('HGET', KEYS[11], id) or ''
  out[#out + 1] = redis.call('HGET', KEYS[6], id) or '1'
  out[#out + 1] = redis.call('HGET', KEYS[7], id) or ''
  out[#out + 1] = rows[i + 1]
end
return out
