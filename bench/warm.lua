-- wrk script of ./dev bench: requests /__warm naming each host of BENCH_WARM_HOSTS (one
-- ip:port a line) in turn in the ORIGINAL_DST header, to create the cluster's hosts and
-- their connections before a measurement.
local hosts = {}
for line in io.lines(os.getenv("BENCH_WARM_HOSTS")) do hosts[#hosts + 1] = line end
local n = 0
request = function()
  n = n + 1
  local h = hosts[(n - 1) % #hosts + 1]
  return wrk.format("GET", "/__warm", {["x-envoy-original-dst-host"] = h})
end
