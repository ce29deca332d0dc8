-- Extend many leases of one queue at once.
-- ARGV[1]: lease (ms); then pairs of id, '|' .. token
-- Returns: one integer per pair, in order: 1 when the deadline is now + lease, 0 when
-- the token does not own the job (see leased_by)
-- Cost: two commands for up to 500 leases.
local deadline = tostring(now_ms() + tonumber(ARGV[1]))
local n = (#ARGV - 1) / 2
local fields = {}
for i = 1, n do
  fields[i] = m(ARGV[2 * i])
end
local metas = hmget_all(KEYS[3], fields)
local out, scores, p = {}, {}, 0
for i = 1, n do
  if leased_by(metas[i], ARGV[2 * i + 1]) then
    out[i] = 1
    scores[p + 1] = deadline
    scores[p + 2] = ARGV[2 * i]
    p = p + 2
  else
    out[i] = 0
  end
end
for i = 1, p, 1000 do
  redis.call('ZADD', KEYS[2], 'XX', unpack(scores, i, math.min(i + 999, p)))
end
return out
