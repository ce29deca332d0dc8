-- ARGV[1]: id; ARGV[2]: token; ARGV[3]: the envelope as delivered, its checkpoint set
-- Returns: 1 when stored (it replaces the envelope, which the job keeps through every
-- later state until its ack), 0 when the token does not own the job
-- The envelope's attempt and history are not read back: the job's meta and history
-- fields stay the source of both.
if not owned(ARGV[1], ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[3], e(ARGV[1]), ARGV[3])
return 1
