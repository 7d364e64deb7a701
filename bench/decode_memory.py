"""Server RSS under concurrent decode bombs: N copies of a ~5 kB 1-bit PNG of 6320x6320 (40 Mpx, under
the pixel cap) sent at once to /detect and /embed (image_type=photo) of a real server.

    python -m bench.decode_memory [--clients 16] [--label NAME] [--env FACE_DECODE_MEMORY_MB=256 ...]

Reports the peak RSS growth over the warmed baseline (sampled from /proc/PID/status every 10 ms),
the answers by status, and the wall time; saves bench/results/decode_memory_<label>.json. Memory, not
speed, is the point: the figures do not need an idle machine.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from PIL import Image

from bench.common import machine, rss_mb, save
from harness.server import ServerProcess


def one_bit_png(side: int = 6320) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def run(clients: int, env: dict[str, str]) -> dict:
    png = one_bit_png()
    bomb = base64.b64encode(png).decode()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "data", env=env)
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url, timeout=300) as client:
                for route, extra in (("/detect", {}), ("/embed", {"image_type": "photo"})):
                    client.post(route, json={"images": [bomb], **extra})
                baseline = rss_mb(server.proc.pid) or 0.0
                peak, stop = [baseline], threading.Event()

                def sample() -> None:
                    while not stop.is_set():
                        peak[0] = max(peak[0], rss_mb(server.proc.pid) or 0.0)
                        time.sleep(0.01)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()

                def send(i: int) -> int:
                    route, extra = [("/detect", {}), ("/embed", {"image_type": "photo"})][i % 2]
                    return client.post(route, json={"images": [bomb], **extra}).status_code

                started = time.perf_counter()
                with cf.ThreadPoolExecutor(clients) as pool:
                    statuses = list(pool.map(send, range(clients)))
                wall = time.perf_counter() - started
                stop.set()
                sampler.join()
        finally:
            server.stop()
    return {"png_bytes": len(png), "pixels": 6320 * 6320, "clients": clients, "baseline_rss_mb": round(baseline),
            "peak_rss_mb": round(peak[0]), "growth_mb": round(peak[0] - baseline),
            "statuses": dict(Counter(statuses)), "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--label", default="current")
    parser.add_argument("--env", nargs="*", default=[], help="FACE_X=value settings for the server")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    result = run(args.clients, env)
    path = save(f"decode_memory_{args.label}", {"machine": machine(), "config": {"env": env}, **result})
    print(result, "->", path)


if __name__ == "__main__":
    main()
