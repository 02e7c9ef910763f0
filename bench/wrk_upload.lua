-- wrk script for `bench/wrk.py`: raw uploads of BENCH_SIZE bytes with the service's headers
-- (X-Container-Name, X-File-Path, Content-Type, and `Authorization: Token` when BENCH_TOKEN is
-- set), a distinct destination path per request, and a count of the answers by status code.
-- done() prints one line, "BENCH-RESULT {json}", with the counts and wrk's own figures.

local container = os.getenv("BENCH_CONTAINER") or "uploadsvc-run"
local directory = os.getenv("BENCH_DIR") or "/tmp/uploadsvc-bench"
local url_path = os.getenv("BENCH_URL_PATH") or "/api/uploads/"
local token = os.getenv("BENCH_TOKEN") or ""
local size = tonumber(os.getenv("BENCH_SIZE") or "1024")

local threads = {}
local next_id = 1

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

function init(args)
   sent = 0
   statuses = {}
   -- Printable bytes that differ from request to request would cost Lua time per request;
   -- the service hashes whatever it gets, so one pseudo-random body serves every request.
   math.randomseed(id)
   local chars = {}
   for i = 1, size do
      chars[i] = string.char(math.random(97, 122))
   end
   body = table.concat(chars)
   headers = {
      ["Content-Type"] = "application/octet-stream",
      ["X-Container-Name"] = container,
   }
   if token ~= "" then
      headers["Authorization"] = "Token " .. token
   end
end

function request()
   sent = sent + 1
   headers["X-File-Path"] = string.format("%s/w%d-%08d", directory, id, sent)
   return wrk.format("POST", url_path, headers, body)
end

function response(status, response_headers, response_body)
   local key = tostring(status)
   statuses[key] = (statuses[key] or 0) + 1
end

local function json_counts(counts)
   local parts = {}
   for key, value in pairs(counts) do
      table.insert(parts, string.format("%q:%d", key, value))
   end
   return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
   local totals = {}
   local sent_total = 0
   for _, thread in ipairs(threads) do
      for key, value in pairs(thread:get("statuses")) do
         totals[key] = (totals[key] or 0) + value
      end
      sent_total = sent_total + thread:get("sent")
   end
   local e = summary.errors
   io.write("BENCH-RESULT ", string.format(
      '{"duration_us":%d,"requests":%d,"sent":%d,"bytes":%d,"statuses":%s,'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
         .. '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"stdev":%.1f,'
         .. '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
      summary.duration, summary.requests, sent_total, summary.bytes, json_counts(totals),
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.max, latency.stdev,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9)))
end
