"""Bounded load test of ``cellrcnn serve`` on 127.0.0.1: requests/s, latency, errors, server memory.

    python bench/serve_load.py                               # 1 and 4 clients, 40 requests each
    python bench/serve_load.py --clients 1,4,8 --requests 80 --time-limit 120 --workers 2

Starts ``python -m cellrcnn.serve`` on a free loopback port (never another host), then for each
number of concurrent clients sends a fixed number of ``POST /segment`` requests (JSON answer)
with the same image, stopping early at the time limit (the server's result cache is off unless
``--cache-megapixels`` is given, so every request is segmented). Reports requests/s, p50/p95 latency, errors
(any answer but 200; 503 = refused by the bounded queue, counted apart), and the server's resident
memory: after start-up and the peak during each run (sampled from /proc every 50 ms; Linux).
Writes ``bench/results/serve_load.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DSB_ZIP = ROOT.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"
DSB_IMAGE = "003cee89357d9fe13516167fd67b609a164651b21934585648c740d2c3d86dc1"  # 256×256 fluorescence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_image(path: str | None) -> tuple[str, bytes]:
    """(name, bytes) of the image sent: ``--image``, a real DSB2018 field when ../shared/data is
    present, else a synthetic 256×256 field of 25 nuclei."""
    if path:
        return Path(path).name, Path(path).read_bytes()
    if DSB_ZIP.is_file():
        with zipfile.ZipFile(DSB_ZIP) as z:
            return "dsb_256x256.png", z.read(f"{DSB_IMAGE}/images/{DSB_IMAGE}.png")
    import io

    from PIL import Image

    yy, xx = np.mgrid[:256, :256]
    image = np.full((256, 256), 20, np.uint8)
    for cy in range(30, 256, 50):
        for cx in range(30, 256, 50):
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < 81] = 200
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "synthetic_256x256.png", buffer.getvalue()


def run_load(url: str, pid: int, clients: int, n_requests: int, time_limit: float, image: tuple[str, bytes]) -> dict:
    """``clients`` threads share ``n_requests`` requests; returns the measured figures."""
    latencies, statuses, lock = [], [], threading.Lock()
    remaining = [n_requests]
    peak = [rss_mb(pid)]
    done = threading.Event()
    deadline = time.monotonic() + time_limit

    def sample_memory():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.05)

    def client():
        with httpx.Client(base_url=url, timeout=time_limit) as http:
            while time.monotonic() < deadline:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                start = time.perf_counter()
                try:
                    status = http.post("/segment", files={"file": (image[0], image[1], "image/png")}).status_code
                except httpx.HTTPError:
                    status = -1  # no answer (connection refused, timeout)
                with lock:
                    latencies.append(time.perf_counter() - start)
                    statuses.append(status)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    ok = [lat for lat, s in zip(latencies, statuses, strict=True) if s == 200]
    q = statistics.quantiles(ok, n=20) if len(ok) >= 2 else [float("nan")] * 19
    return {
        "clients": clients, "requests": len(statuses), "ok": len(ok), "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "p50_s": round(statistics.median(ok), 3) if ok else None, "p95_s": round(q[18], 3) if ok else None,
        "errors": sum(s != 200 for s in statuses), "refused_503": sum(s == 503 for s in statuses),
        "peak_rss_mb": round(peak[0], 1), "stopped_by_time_limit": len(statuses) < n_requests,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,4", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=40, help="requests per client count (fixed)")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per client count, at most")
    p.add_argument("--workers", type=int, default=1, help="the server's --workers")
    p.add_argument("--max-queue", type=int, default=8, help="the server's --max-queue")
    p.add_argument("--threads", type=int, default=None, help="the server's --threads (torch threads per worker)")
    p.add_argument("--cache-megapixels", type=float, default=0.0,
                   help="the server's result cache; off by default, since every request sends the same image")
    p.add_argument("--model", default="nuclei")
    p.add_argument("--image", default=None, help="image file to send (default: a 256×256 nucleus field)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load"), help="results path without suffix")
    args = p.parse_args(argv)

    image = test_image(args.image)
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine shares its cores
    port = free_port()
    command = [sys.executable, "-m", "cellrcnn.serve", "--host", "127.0.0.1", "--port", str(port), "--model",
               args.model, "--workers", str(args.workers), "--max-queue", str(args.max_queue), "--log-level", "warning",
               "--cache-megapixels", str(args.cache_megapixels)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        start = time.perf_counter()
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.perf_counter() - start > 180:
                print(server.stderr.read() if server.poll() is not None else "no answer in 180 s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        startup_s, idle_mb = time.perf_counter() - start, rss_mb(server.pid)
        httpx.post(f"{url}/segment", files={"file": (image[0], image[1], "image/png")}, timeout=120)  # warm-up
        for clients in (int(c) for c in args.clients.split(",")):
            row = run_load(url, server.pid, clients, args.requests, args.time_limit, image)
            rows.append(row)
            print(json.dumps(row))
    finally:
        server.terminate()
        server.wait(timeout=30)

    setup = {"image": image[0], "image_bytes": len(image[1]), "model": args.model, "workers": args.workers,
             "cache_megapixels": args.cache_megapixels,
             "max_queue": args.max_queue, "threads": args.threads, "startup_s": round(startup_s, 1),
             "rss_after_startup_mb": round(idle_mb, 1), "cpus": os.cpu_count(), "load_average_before": load_before,
             "machine": platform.machine(), "command": "python bench/serve_load.py " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "runs": rows}, indent=1))
    lines = [f"`{setup['command'].strip()}`: {image[0]} ({len(image[1]) / 1024:.0f} kB), model {args.model}, "
             f"--workers {args.workers} --max-queue {args.max_queue}, {setup['cpus']} CPUs (1-min load average "
             f"{load_before} before the run); server ready in "
             f"{setup['startup_s']} s, {setup['rss_after_startup_mb']} MB resident after start-up.", "",
             "| clients | requests | requests/s | p50 latency (s) | p95 latency (s) | errors (503) | peak server RSS (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['p50_s']} | {r['p95_s']} | "
                     f"{r['errors']} ({r['refused_503']}) | {r['peak_rss_mb']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
