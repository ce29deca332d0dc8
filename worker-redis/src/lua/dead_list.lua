-- ARGV[1]: the last rank to return (most to return - 1), sent as text: a limit near
--          2^63 does not survive Lua's numbers
-- Returns: flat list of sextuples, oldest first: id, envelope, reason, attempt,
--          history JSON ('' if none), died at (ms)
local rows = redis.call('ZRANGE', KEYS[5], 0, ARGV[1], 'WITHSCORES')
local out = {}
for i = 1, #rows, 2 do
  local id = rows[i]
  local vals = redis.call('HMGET', KEYS[6], e(id), r(id), m(id), h(id))
  local attempt = parse_meta(vals[3])
  out[#out + 1] = id
  out[#out + 1] = vals[1] or ''
  out[#out + 1] = vals[2] or ''
  out[#out + 1] = attempt
  out[#out + 1] = vals[4] or ''
  out[#out + 1] = rows[i + 1]
end
return out
