-- wrk script: POST distinct SMS_MO postbacks (a unique TRANSACTIONID each), report JSON.
local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  counter = 0
  prefix = tostring(os.time()) .. "-" .. tostring(tid)
  path = args[1] or "/postback"
  pause_ms = tonumber(args[2] or "0")
end

-- with a pause, each connection waits that long between requests: an offered rate, not "as
-- fast as the server answers"
function delay()
  return pause_ms
end

function request()
  counter = counter + 1
  -- texters' numbers scattered as real ones are (a permutation of 10^7 numbers per thread), not
  -- in sequence: the store indexes by sender, and sequential keys would flatter it
  local sender = (counter * 7919 + tid * 1000003) % 10000000
  local body = "<POSTBACK><ORIGIN>SMS_MO</ORIGIN><CODE>N211</CODE><FROM>1555" ..
    string.format("%07d", sender) .. "</FROM><TO>86717</TO><TEXT>HELLO bench " ..
    counter .. "</TEXT><RECEIVED>2024-05-01T12:00:00-04:00</RECEIVED><TRANSACTIONID>" ..
    prefix .. "-" .. counter .. "</TRANSACTIONID></POSTBACK>"
  return wrk.format("POST", path, {["Content-Type"] = "text/xml"}, body)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, errors.status,
    errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
