-- Ack a batch of deliveries of one queue at once.
-- ARGV: pairs of id, token
-- Returns: one integer per pair, in order: 1 when acked (the job is gone), 0 when the
--          token does not own it (or the pair repeats an earlier one)
-- Cost: three commands per batch, whatever its size.
local n = #ARGV / 2
local fields = {}
for i = 1, n do
  fields[i] = m(ARGV[2 * i - 1])
end
local metas = hmget_all(KEYS[3], fields)
local out, gone, drop, seen = {}, {}, {}, {}
for i = 1, n do
  local id, token = ARGV[2 * i - 1], ARGV[2 * i]
  local _, _, t = parse_meta(metas[i])
  if metas[i] and t ~= '' and t == token and not seen[id] then
    seen[id] = true
    out[i] = 1
    gone[#gone + 1] = id
    drop[#drop + 1] = e(id)
    drop[#drop + 1] = m(id)
    drop[#drop + 1] = h(id)
  else
    out[i] = 0
  end
end
if #gone > 0 then
  chunked('ZREM', KEYS[2], gone)
  chunked('HDEL', KEYS[3], drop)
end
return out
