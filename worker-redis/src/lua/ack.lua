-- Ack a batch of deliveries of one queue at once.
-- ARGV: pairs of id, '|' .. token
-- Returns: one integer per pair, in order (see ack_all)
local ids, suffixes = {}, {}
for i = 1, #ARGV / 2 do
  ids[i] = ARGV[2 * i - 1]
  suffixes[i] = ARGV[2 * i]
end
return ack_all(KEYS[2], KEYS[3], ids, suffixes)
