"""`serve` under a bounded concurrent load on loopback: latency (p50, p95) and requests/s for search
by upload and by id, beside the baseline of one `simsiam-embed search` process per query.

    python bench/bench_serve.py --workspace demo-workspace [--requests 200] [--concurrency 4]

The workspace must hold an index (`simsiam-embed index`); for the first-request thumbnail row to
mean what it says, start without `index/thumbnails/`. The server runs as the user runs it
(`simsiam-embed serve --port 0`); every request goes to 127.0.0.1 only, and the load stops
after --requests requests of each kind or --max-seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.request import Request, urlopen

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from simsiam_embed.index.store import load_index

CLI = Path(sys.executable).parent / "simsiam-embed"


def upload_request(url: str, image: bytes, name: str) -> Request:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def timed(make_request) -> float:
    started = time.perf_counter()
    with urlopen(make_request(), timeout=60) as response:
        response.read()
        assert response.status == 200
    return time.perf_counter() - started


def load(make_requests: list, concurrency: int, max_seconds: float) -> tuple[list[float], float]:
    deadline = time.monotonic() + max_seconds
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(lambda make: timed(make) if time.monotonic() < deadline else None, make_requests))
    latencies = [latency for latency in latencies if latency is not None]
    return latencies, len(latencies) / (time.perf_counter() - started)


def percentile(values: list[float], share: float) -> float:
    return sorted(values)[min(len(values) - 1, int(share * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-seconds", type=float, default=120)
    args = parser.parse_args()
    loaded = load_index(args.workspace / "index", for_search=False)
    entries = list(loaded.entries.values())
    queries = [Path(entries[i * len(entries) // args.requests].path) for i in range(args.requests)]
    ids = [entries[i * len(entries) // args.requests].id for i in range(args.requests)]

    server = subprocess.Popen([str(CLI), "serve", "--port", "0", "--workspace", str(args.workspace)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+)/", line).group(1)
        timed(lambda: Request(f"{url}/api/status"))
        timed(lambda: upload_request(f"{url}/api/search?k=10", queries[0].read_bytes(), queries[0].name))   # warm
        print(f"machine: {machine()}; index of {loaded.count} images ({loaded.manifest.index_type}, "
              f"{loaded.manifest.dim}-d); {args.requests} requests a kind, {args.concurrency} at a time, loopback")
        print("| request | requests | p50 (ms) | p95 (ms) | requests/s |")
        print("|---|---|---|---|---|")
        kinds = {
            "search by upload (k=10)": [
                (lambda q=q: upload_request(f"{url}/api/search?k=10", q.read_bytes(), q.name)) for q in queries],
            "search by id (k=10)": [(lambda i=i: Request(f"{url}/api/search/{i}?k=10")) for i in ids],
            "thumbnail, first request (made, then cached)": [
                (lambda i=i: Request(f"{url}/api/thumbnails/{i}")) for i in ids],
            "thumbnail, again (from the cache)": [(lambda i=i: Request(f"{url}/api/thumbnails/{i}")) for i in ids],
        }
        for name, requests in kinds.items():
            latencies, rate = load(requests, args.concurrency, args.max_seconds)
            print(f"| {name} | {len(latencies)} | {statistics.median(latencies) * 1000:.1f} | "
                  f"{percentile(latencies, 0.95) * 1000:.1f} | {rate:.1f} |", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)

    cli_times = []
    for query in queries[:5]:
        started = time.perf_counter()
        subprocess.run([str(CLI), "search", str(query), "--json", "--workspace", str(args.workspace)], check=True,
                       capture_output=True)
        cli_times.append(time.perf_counter() - started)
    print(f"| baseline: one `simsiam-embed search` process a query | 5 | {statistics.median(cli_times) * 1000:.0f} | "
          f"{max(cli_times) * 1000:.0f} | {1 / statistics.median(cli_times):.2f} |")


if __name__ == "__main__":
    main()
