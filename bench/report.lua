-- wrk script of ./dev bench: prints one JSON line with the run's figures.
-- Latencies are in microseconds. summary.errors.status counts answers >= 400.
-- Requests cycle through 1,024 paths `/?k=N` (prebuilt), so a policy hashing the path
-- (ring_hash with hash_on path) sees many keys; every configuration gets the same load.
local reqs = {}
local n = 0

init = function(args)
  for i = 1, 1024 do
    reqs[i] = wrk.format(nil, "/?k=" .. i)
  end
end

request = function()
  n = n % 1024 + 1
  return reqs[n]
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "err_connect": %d, "err_read": %d, ' ..
    '"err_write": %d, "err_status": %d, "err_timeout": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "p999_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
