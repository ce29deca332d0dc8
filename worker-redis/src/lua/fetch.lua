-- ARGV[1]: how many; ARGV[2]: lease (ms); ARGV[3..]: one fresh token per job
-- Returns: flat list of sextuples: id, envelope, attempt, history JSON ('' if none),
--          ready-since (ms), token; then one last item: ms until the first delayed job
--          is due, or -1 when none is (so an idle worker knows when to look again)
-- Invariant: a fetched job is in `inflight` with its token; due delayed jobs are
-- promoted first (at most 1000 per call, so a huge backlog cannot stall the server).
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[5], id)
  redis.call('RPUSH', KEYS[1], id)
end
local n = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local out = {}
local taken = 0
while taken < n do
  local ids = redis.call('LPOP', KEYS[1], n - taken)
  if not ids then
    break
  end
  for _, id in ipairs(ids) do
    local env = redis.call('HGET', KEYS[4], id)
    if env then
      taken = taken + 1
      local token = ARGV[2 + taken]
      redis.call('ZADD', KEYS[2], now + lease, id)
      redis.call('HSET', KEYS[3], id, token)
      out[#out + 1] = id
      out[#out + 1] = env
      out[#out + 1] = redis.call('HGET', KEYS[6], id) or '1'
      out[#out + 1] = redis.call('HGET', KEYS[7], id) or ''
      out[#out + 1] = redis.call('HGET', KEYS[8], id) or '0'
      out[#out + 1] = token
    end
  end
end
local first = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
if first[2] then
  out[#out + 1] = tostring(math.max(0, tonumber(first[2]) - now))
else
  out[#out + 1] = '-1'
end
return out
