-- wrk script of ./dev soak (run with -t1): counts answers per second of the wall clock
-- and appends one line per second to $SOAK_SERIES: `<unix second> <2xx> <non-2xx>`.
-- Socket errors (connect, read, write, timeout) never reach response(): they are in the
-- summary only, printed by done() as one JSON line. The second the load ends in is not
-- written (done() runs in another Lua state); the summary has every request.
local out
local sec, ok, bad, shown = 0, 0, 0, 0
local delay_ms = tonumber(os.getenv("SOAK_DELAY_MS") or "0")

init = function(args)
  out = assert(io.open(os.getenv("SOAK_SERIES"), "a"))
end

if delay_ms > 0 then
  delay = function() return delay_ms end
end

response = function(status, headers, body)
  local now = os.time()
  if now ~= sec then
    if sec ~= 0 then
      out:write(string.format("%d %d %d\n", sec, ok, bad))
      out:flush()
    end
    sec, ok, bad = now, 0, 0
  end
  if status >= 200 and status < 300 then
    ok = ok + 1
  else
    bad = bad + 1
    -- The first few non-2xx answers in full, for their cause.
    if shown < 20 then
      shown = shown + 1
      local h = {}
      for k, v in pairs(headers) do h[#h + 1] = k .. "=" .. v end
      out:write(string.format("# %d %d %s | %s\n", now, status, table.concat(h, " "), (body or ""):sub(1, 200):gsub("\n", " ")))
    end
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "err_connect": %d, "err_read": %d, "err_write": %d, ' ..
    '"err_status": %d, "err_timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
