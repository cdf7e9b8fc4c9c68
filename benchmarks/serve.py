"""Closed-loop load test of `python -m dist_finetune.serve` from 127.0.0.1: dynamic batching against one request
per forward pass, at 1, 8 and 32 concurrent clients, one text per request, for a fixed time each.

    python benchmarks/serve.py [--model runs/quickstart] [--seconds 5]

Without --model, a model of the quickstart's shape (2 layers, 64 wide, random weights) is exported to a temporary
folder: serving cost does not depend on what the weights learned. Prints requests/s, texts/s and p50/p95/p99.
"""
from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["WINNER!! You have won a prize, call 09061701461 now to claim", "see you at 8", "ok lar... joking",
         "Free entry in 2 a wkly comp to win FA Cup final tkts", "Nah I don't think he goes to usf, he lives around"]
MODES = {"dynamic batching": [], "one request per forward": ["--max-batch", "1", "--max-wait-ms", "0"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_export(folder: Path) -> Path:
    import torch

    from dist_finetune.model import GPTClassifier, GPTConfig
    from dist_finetune.weights import save_export

    torch.manual_seed(0)
    model = GPTClassifier(GPTConfig(n_layer=2, n_head=4, n_embd=64, context_length=128), 2, "last_token")
    save_export(model, folder, "last_token", ["ham", "spam"], max_length=64, padding="fixed")
    return folder


def start(model: Path, flags: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dist_finetune.serve", "--model", str(model), "--port", str(port),
                             *flags], cwd=REPO, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def load(url: str, clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            n = i
            while time.perf_counter() < stop:
                start = time.perf_counter()
                response = http.post(f"{url}/v1/classify", json={"text": TEXTS[n % len(TEXTS)]})
                elapsed = time.perf_counter() - start
                assert response.status_code == 200, response.text
                with lock:
                    latencies.append(elapsed)
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"requests_per_second": len(ordered) / wall, "p50_ms": statistics.median(ordered) * 1000,
            "p95_ms": pick(0.95), "p99_ms": pick(0.99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="an export or run folder (default: a quickstart-shaped random model)")
    p.add_argument("--seconds", type=float, default=5.0, help="load time per row (default: 5)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_export(Path(tmp) / "export")
        print("| mode | clients | requests/s | texts/s | p50 ms | p95 ms | p99 ms |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for mode, flags in MODES.items():
            proc, url = start(model, flags)
            try:
                load(url, 4, 1.0)  # warm-up
                for clients in (1, 8, 32):
                    r = load(url, clients, args.seconds)
                    print(f"| {mode} | {clients} | {r['requests_per_second']:.1f} | {r['requests_per_second']:.1f} | "
                          f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} |", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)


if __name__ == "__main__":
    main()
