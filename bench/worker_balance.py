"""How evenly the HTTP workers share connections: each worker's share of the responses under wrk.

    python bench/worker_balance.py                       # 2 and 4 workers, 3 runs each
    python bench/worker_balance.py --landed /tmp/landed  # the same runs on another checkout, alternating

`python -m service` (embedded model) with `--workers N`; `wrk -t1 -c64 -d5s` on
`POST /classify?task=sketch` with a 48-px JPEG; a wrk Lua `response()` counts the `x-mmap-worker`
header of every response. Goal (docs/benchmarks.md, "Worker balance"): with 4 workers every worker
answers 15-35 % of the responses in each run. `--landed DIR` is a checkout to compare with
(`git worktree add DIR <commit>`), served from DIR on this interpreter.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path

from uploads import synthetic_jpegs
from wrk_load import REPO, WRK, Server

LUA = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  local f = io.open(args[1], "rb"); local body = f:read("*a"); f:close()
  request_bytes = wrk.format("POST", "/classify?task=sketch", {["Content-Type"] = "image/jpeg"}, body)
  counts = {}
end
function request() return request_bytes end
function response(status, headers, body)
  local worker = headers["x-mmap-worker"] or ("status " .. status)
  counts[worker] = (counts[worker] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for worker, n in pairs(thread:get("counts")) do total[worker] = (total[worker] or 0) + n end
  end
  io.write("WORKERS")
  for worker, n in pairs(total) do io.write(" " .. worker .. "=" .. n) end
  io.write("\\n")
end
"""


def shares(base: str, script: Path, body: Path, workers: int, connections: int, seconds: int) -> dict:
    out = subprocess.run([WRK, "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), base, "--", str(body)],
                         capture_output=True, text=True, check=True).stdout
    counts = {k: int(v) for k, v in re.findall(r"(\S+)=(\d+)", re.search(r"^WORKERS(.*)$", out, re.M).group(1))}
    total = sum(counts.values())
    per_worker = [counts.get(str(i), 0) / total for i in range(workers)]
    return {"responses": total, "counts": counts, "shares": per_worker, "min_share": min(per_worker),
            "max_share": max(per_worker), "rps": total / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--landed", type=Path, help="another checkout to run the same way, alternating")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results: dict = {"connections": args.connections, "seconds": args.seconds, "runs": {}}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="balance-")))
        script, body = tmp / "balance.lua", tmp / "body.jpg"
        script.write_text(LUA)
        body.write_bytes(synthetic_jpegs(1, 48)[0])
        checkouts = {"this": REPO, **({"landed": args.landed} if args.landed else {})}
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MMAP_")}
        for workers in args.workers:
            for name, checkout in checkouts.items():
                server = Server(name, checkout, ["--workers", str(workers), "--watch-interval-s", "0",
                                                 "--log-level", "warning"], 18090, tmp / f"{name}.log", env)
                try:
                    runs = [shares(server.base, script, body, workers, args.connections, args.seconds)
                            for _ in range(args.runs)]
                finally:
                    server.stop()
                results["runs"][f"{name} {workers} workers"] = runs
                for run in runs:
                    print(f"{name}, {workers} workers: {run['responses']} responses, shares "
                          + " / ".join(f"{s:.0%}" for s in run["shares"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
