-- Ack a batch of deliveries of one queue at once.
-- ARGV: pairs of id, token
-- Returns: one integer per pair, in order: 1 when acked (the job is gone), 0 when the
--          token does not own it (or the pair repeats an earlier one)
-- Cost: a fixed handful of commands per batch, whatever its size.
local n = #ARGV / 2
local ids = {}
for i = 1, n do
  ids[i] = ARGV[2 * i - 1]
end
local tokens = hmget_all(KEYS[3], ids)
local out, gone, seen = {}, {}, {}
for i = 1, n do
  local id = ids[i]
  if tokens[i] == ARGV[2 * i] and not seen[id] then
    seen[id] = true
    out[i] = 1
    gone[#gone + 1] = id
  else
    out[i] = 0
  end
end
if #gone > 0 then
  chunked('ZREM', KEYS[2], gone)
  for _, k in ipairs({3, 4, 6, 7, 8}) do
    chunked('HDEL', KEYS[k], gone)
  end
end
return out
