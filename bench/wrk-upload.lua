-- wrk script for bench/webserver.py: 1 KiB raw uploads to the upload endpoint, as the seed's
-- clients send them. The token, instance and path come from the environment.
wrk.method = "POST"
wrk.body = string.rep("u", 1024)
wrk.headers["Authorization"] = "Token " .. os.getenv("BENCH_TOKEN")
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["X-Container-Name"] = os.getenv("BENCH_CONTAINER")
wrk.headers["X-File-Path"] = os.getenv("BENCH_PATH")
