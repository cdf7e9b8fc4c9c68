"""Inference benchmark in one run: `python -m dist_finetune.serve` under a closed-loop load from 127.0.0.1 (dynamic
batching against one request per forward pass, torch against ONNX, at 1, 8 and 32 concurrent clients, one text per
request, for a fixed time each), then bulk `predict --input --output` on 1 and 2 ranks.

    python benchmarks/serve.py [--model RUN_DIR] [--seconds 5] [--bulk-rows 20000] [--json FILE]

Without --model, a model of the quickstart's shape (2 layers, 64 wide, random weights) is exported to a temporary
folder in both formats: serving cost does not depend on what the weights learned. With --model RUN_DIR, its
export/ and export_onnx/ are used (the onnx rows are skipped without export_onnx/). The load generator is one
keep-alive http.client connection per client thread, the lightest Python client, since it shares the CPU with
the server. Prints requests/s, texts/s and p50/p95/p99 latency, then bulk texts/s.
"""
from __future__ import annotations

import argparse
import csv
import http.client
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["WINNER!! You have won a prize, call 09061701461 now to claim", "see you at 8", "ok lar... joking",
         "Free entry in 2 a wkly comp to win FA Cup final tkts", "Nah I don't think he goes to usf, he lives around"]
MODES = {"dynamic batching": [], "one request per forward": ["--max-batch", "1", "--max-wait-ms", "0"]}
CLIENTS = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run(folder: Path) -> Path:
    """A folder laid out as a run's: export/ and export_onnx/ of one random quickstart-shaped model."""
    import torch

    from dist_finetune.model import GPTClassifier, GPTConfig
    from dist_finetune.weights import save_export

    torch.manual_seed(0)
    model = GPTClassifier(GPTConfig(n_layer=2, n_head=4, n_embd=64, context_length=128), 2, "last_token").eval()
    for fmt, name in (("native", "export"), ("onnx", "export_onnx")):
        save_export(model, folder / name, "last_token", ["ham", "spam"], max_length=64, padding="fixed", fmt=fmt)
    return folder


def start(model: Path, flags: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dist_finetune.serve", "--model", str(model), "--port", str(port),
                             *flags], cwd=REPO, stdout=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if post(http.client.HTTPConnection("127.0.0.1", port, timeout=1), "GET", "/readyz") == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def post(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> int:
    conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
    response = conn.getresponse()
    response.read()
    return response.status


def load(port: int, clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    lock = threading.Lock()
    bodies = [json.dumps({"text": t}).encode() for t in TEXTS]
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        conn, mine, n = http.client.HTTPConnection("127.0.0.1", port, timeout=60), [], i
        while time.perf_counter() < stop:
            begin = time.perf_counter()
            status = post(conn, "POST", "/v1/classify", bodies[n % len(bodies)])
            mine.append(time.perf_counter() - begin)
            assert status == 200, status
            n += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"requests_per_second": len(ordered) / wall, "texts_per_second": len(ordered) / wall,
            "p50_ms": statistics.median(ordered) * 1000, "p95_ms": pick(0.95), "p99_ms": pick(0.99)}


def serve_rows(run: Path, seconds: float, backends: list[str]) -> list[dict]:
    rows = []
    print("| backend | mode | clients | requests/s | texts/s | p50 ms | p95 ms | p99 ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for backend in backends:
        for mode, flags in MODES.items():
            proc, port = start(run, ["--backend", backend, *flags])
            try:
                load(port, 4, 1.0)  # warm-up
                for clients in CLIENTS:
                    r = {"backend": backend, "mode": mode, "clients": clients, **load(port, clients, seconds)}
                    rows.append(r)
                    print(f"| {backend} | {mode} | {clients} | {r['requests_per_second']:.1f} | "
                          f"{r['texts_per_second']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} |",
                          flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    return rows


def bulk_rows(run: Path, rows: int, tmp: Path) -> list[dict]:
    source = tmp / "bulk.csv"
    with source.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows((i, f"{TEXTS[i % len(TEXTS)]} #{i}") for i in range(rows))
    results = []
    print(f"\n| bulk predict ({rows} CSV rows) | ranks | seconds | texts/s |")
    print("|---|---:|---:|---:|")
    for nproc in (1, 2):
        out = tmp / f"bulk_{nproc}.csv"
        begin = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dist_finetune.predict", "--model", str(run), "--input", str(source),
                        "--output", str(out), "--nproc", str(nproc), "--overwrite"], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - begin
        results.append({"ranks": nproc, "seconds": wall, "texts_per_second": rows / wall})
        print(f"| torch | {nproc} | {wall:.1f} | {rows / wall:.0f} |", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a run folder (default: a quickstart-shaped random model)")
    p.add_argument("--seconds", type=float, default=5.0, help="load time per row (default: 5)")
    p.add_argument("--bulk-rows", type=int, default=20000, help="rows of the bulk predict file (default: 20000)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.model or tiny_run(Path(tmp) / "run")
        backends = ["torch", "onnx"] if (run / "export_onnx").is_dir() else ["torch"]
        figures = {"serve": serve_rows(run, args.seconds, backends),
                   "bulk": bulk_rows(run, args.bulk_rows, Path(tmp))}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
