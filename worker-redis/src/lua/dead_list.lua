-- ARGV[1]: most to return
-- Returns: flat list of sextuples, oldest first: id, envelope, reason, attempt,
--          history JSON ('' if none), died at (ms)
local rows = redis.call('ZRANGE', KEYS[5], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
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
