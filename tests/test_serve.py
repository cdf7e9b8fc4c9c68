"""`python -m dist_finetune.serve`: the real server process on a free 127.0.0.1 port, talked to over HTTP."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import runner
from dist_finetune import Classifier
from dist_finetune.model import GPTClassifier, GPTConfig
from dist_finetune.serve import Batcher, Metrics
from dist_finetune.weights import save_export

TEXTS = ["WINNER! Claim your prize now", "see you at 8", "ok", "Free entry in a weekly competition, txt WIN",
         "Are you coming home for dinner tonight or not?", "URGENT! call 0800 now", "thanks, love you",
         "Où est la gare? 日本語 ✓", "a " * 80, "lol"]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return runner.tiny_export(tmp_path_factory.mktemp("serve") / "export")


def start(export: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = runner.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dist_finetune.serve", "--model", str(export), "--port", str(port),
                             *flags], cwd=runner.REPO, env=runner.child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    runner.kill_tree(proc.pid)
    raise AssertionError("the server did not become ready in 90 s")


@pytest.fixture(scope="module")
def server(export):
    proc, url = start(export, "--max-texts", "16", "--max-bytes", "20000")
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.communicate()


def same(answers: list[dict], texts: list[str], clf: Classifier) -> None:
    for answer, mine in zip(answers, clf.predict(texts)):
        assert answer["label"] == mine.label
        assert answer["probabilities"] == pytest.approx(mine.probabilities, abs=1e-6)


def test_answers_equal_predict_one_by_one_and_together(server, export):
    clf = Classifier.load(export, device="cpu")
    together = httpx.post(f"{server}/v1/classify", json={"texts": TEXTS}, timeout=60)
    assert together.status_code == 200
    same(together.json()["predictions"], TEXTS, clf)
    one = httpx.post(f"{server}/v1/classify", json={"text": TEXTS[0]}, timeout=60).json()["predictions"]
    same(one, TEXTS[:1], clf)
    card = httpx.get(f"{server}/v1/model").json()
    assert card["labels"] == ["ham", "spam"] and card["max_length"] == 32 and card["task"] == "single_label"
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert "<textarea" in httpx.get(f"{server}/").text


def test_32_concurrent_clients_are_batched_and_each_gets_its_own_answers(server, export):
    clf = Classifier.load(export, device="cpu")
    before = batches(server)
    results: dict[int, list] = {}

    def client(i: int) -> None:
        texts = [TEXTS[(i + k) % len(TEXTS)] for k in range(1 + i % 3)]
        response = httpx.post(f"{server}/v1/classify", json={"texts": texts}, timeout=120)
        results[i] = [texts, response.status_code, response.json()]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for texts, status, body in results.values():
        assert status == 200
        same(body["predictions"], texts, clf)
    assert batches(server) - before < 32  # some forward passes served several requests


def batches(url: str) -> int:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return int(next(line for line in lines if line.startswith("dist_finetune_batch_texts_count")).split()[1])


@pytest.mark.parametrize("body,status,field", [
    (b"not json", 400, "body"),
    (b'["a list"]', 422, "texts"),
    (b"{}", 422, "texts"),
    (b'{"texts": "one string"}', 422, "texts"),
    (b'{"texts": []}', 422, "texts"),
    (b'{"texts": ["fine", 7]}', 422, "texts[1]"),
    (b'{"texts": ["fine", "  "]}', 422, "texts[1]"),
    (b'{"text": null}', 422, "text"),
    (b'{"text": "a", "texts": ["b"]}', 422, "texts"),
    (json.dumps({"texts": ["x"] * 17}).encode(), 413, "texts"),
    (json.dumps({"text": "x" * 30000}).encode(), 413, "body"),
    (b'{"texts": ["a"], "pairs": ["b"]}', 422, "pairs"),
])
def test_client_mistakes_are_4xx_naming_the_field_and_the_server_goes_on(server, body, status, field):
    response = httpx.post(f"{server}/v1/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field
    assert httpx.post(f"{server}/v1/classify", json={"text": "still serving"}).status_code == 200


def test_sigterm_finishes_the_request_in_flight_then_exits_0(export):
    proc, url = start(export, "--max-wait-ms", "800")  # the first request waits 0.8 s for company
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(r=httpx.post(f"{url}/v1/classify",
                                                                        json={"texts": TEXTS}, timeout=60)))
    thread.start()
    time.sleep(0.3)  # the request is in the batcher's queue
    proc.send_signal(signal.SIGTERM)
    thread.join(timeout=60)
    assert answer["r"].status_code == 200 and len(answer["r"].json()["predictions"]) == len(TEXTS)
    assert proc.wait(timeout=60) == 0


def test_a_port_in_use_is_one_line(export, tmp_path):
    proc, url = start(export)
    try:
        port = url.rsplit(":", 1)[1]
        other = subprocess.run([sys.executable, "-m", "dist_finetune.serve", "--model", str(export), "--port", port],
                               cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=120)
        assert other.returncode == 2 and "cannot listen" in other.stderr, other.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.mark.slow
def test_a_model_of_text_pairs_is_served_with_pairs(tmp_path):
    torch.manual_seed(1)
    folder = tmp_path / "pairs"
    model = GPTClassifier(GPTConfig(n_layer=2, n_head=4, n_embd=64, context_length=128), 2, "last_token")
    save_export(model, folder, "last_token", ["no", "yes"], max_length=48, padding="longest",
                text_pair_column="hypothesis")
    proc, url = start(folder)
    try:
        firsts, seconds = TEXTS, [t[::-1] or "x" for t in reversed(TEXTS)]
        got = httpx.post(f"{url}/v1/classify", json={"texts": firsts, "pairs": seconds}, timeout=60)
        assert got.status_code == 200, got.text
        mine = Classifier.load(folder, device="cpu").predict(firsts, pairs=seconds)
        for answer, p in zip(got.json()["predictions"], mine):
            assert answer["label"] == p.label
            assert answer["probabilities"] == pytest.approx(p.probabilities, abs=1e-6)
        one = httpx.post(f"{url}/v1/classify", json={"text": firsts[0], "pair": seconds[0]}).json()["predictions"]
        assert one[0]["probabilities"] == pytest.approx(mine[0].probabilities, abs=1e-6)
        for body, field in (({"texts": ["a"]}, "pairs"), ({"texts": ["a", "b"], "pairs": ["c"]}, "pairs"),
                            ({"text": "a", "pair": " "}, "pair")):
            bad = httpx.post(f"{url}/v1/classify", json=body)
            assert bad.status_code == 422 and bad.json()["error"]["field"] == field, bad.text
        assert httpx.get(f"{url}/v1/model").json()["pairs"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.communicate()


def _raw_request(url: str, head: str, body: bytes) -> str:
    """Send a request's head and the start of its body, never the rest; the server's answer (waits 20 s)."""
    host, port = url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=20) as conn:
        conn.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{head}"
                     "\r\n".encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _content_length(answer):
            piece = conn.recv(65536)  # the head and the body may come in separate reads
            if not piece:
                break
            answer += piece
        return answer.decode("utf-8", "replace")


def _content_length(answer: bytes) -> int:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    return next((int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.startswith("content-length:")), 0)


def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(server):
    declared = _raw_request(server, f"Content-Length: {10**12}\r\n", b'{"text": "')  # was: waited for 1 TB
    assert declared.startswith("HTTP/1.1 413") and "the request body has 1000000000000 bytes" in declared, declared
    chunk = b'{"text": "' + b"x" * 30000
    chunked = _raw_request(server, "Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n" % (len(chunk), chunk))
    assert chunked.startswith("HTTP/1.1 413") and "more than 20000 bytes" in chunked, chunked  # was: read it all
    assert httpx.post(f"{server}/v1/classify", json={"text": "still serving"}).status_code == 200


def test_json_nested_too_deeply_is_a_400(server):
    body = b'{"text": ' + b"[" * 9000 + b"]" * 9000 + b"}"  # was: a 500 (RecursionError)
    response = httpx.post(f"{server}/v1/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["field"] == "body", response.text


def test_one_request_of_many_texts_is_predicted_in_forward_passes_of_max_batch(export):
    clf = Classifier.load(export, device="cpu")
    sizes = []

    class Counting:
        pairs = False

        def predict(self, texts, batch_size, pairs=None):
            sizes.append(batch_size)
            return clf.predict(texts, batch_size)

    async def classify() -> list:
        batcher = Batcher(Counting(), 4, 0.0, Metrics())
        task = asyncio.create_task(batcher.run())
        try:
            return await batcher.classify(TEXTS)
        finally:
            task.cancel()

    got = asyncio.run(classify())
    assert sizes == [4]  # was: len(TEXTS), one forward of 10 texts for --max-batch 4
    assert [p.label for p in got] == [p.label for p in clf.predict(TEXTS)]
