"""Screenshot of the operator dashboard under live traffic, for the README: docs/dashboard.png.

Starts `tokenmill serve` (default: the embedded SmolLM2, or --model / extra serve arguments after `--`), or uses a
running server (--url); sends mixed traffic for --seconds (chat requests sharing a system prompt, so the prefix
cache hits, and repeated greedy requests, so a response cache hits when one is configured), then opens
/dashboard in headless Chromium while the traffic still runs and saves a full-page screenshot.

    python benchmarks/dashboard_screenshot.py
    python benchmarks/dashboard_screenshot.py --url http://127.0.0.1:8000 --seconds 60 --window 60
    python benchmarks/dashboard_screenshot.py -- --config models.yaml
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SYSTEM = "You are a concise assistant for an operations team. Answer in one or two sentences."
QUESTIONS = ["What is a KV cache?", "Why batch requests?", "Name three prime numbers.", "What does TTFT mean?",
             "Explain preemption briefly.", "Give a tip for writing clear logs.", "What is a token?",
             "Why quantise weights?", "What is prefix caching?", "Define throughput."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(serve_args: list[str], timeout: float) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="tokenmill-dashboard-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port), *serve_args],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}; log: {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log.name
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"server not healthy after {timeout:.0f} s; log: {log.name}")


def traffic(url: str, model: str, stop: threading.Event, worker: int, headers: dict[str, str]) -> int:
    rng = random.Random(worker)
    done = 0
    with httpx.Client(timeout=300, headers=headers) as client:
        while not stop.is_set():
            if rng.random() < 0.3:  # a repeated deterministic request
                body = {"model": model, "prompt": "The three laws of thermodynamics are", "max_tokens": 24,
                        "temperature": 0}
                client.post(url + "/v1/completions", json=body)
            else:
                messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": rng.choice(QUESTIONS)}]
                body = {"model": model, "messages": messages, "max_tokens": rng.choice([32, 64, 96]),
                        "temperature": 0.7, "seed": rng.randrange(1 << 30)}
                client.post(url + "/v1/chat/completions", json=body)
            done += 1
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="use this running server instead of starting one")
    ap.add_argument("--model", default=None, help="--model for the server started here (default: embedded SmolLM2)")
    ap.add_argument("--seconds", type=float, default=40, help="seconds of traffic before the screenshot")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--window", type=int, default=60, help="the dashboard's window, seconds")
    ap.add_argument("--width", type=int, default=1400, help="browser viewport width")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "dashboard.png"))
    ap.add_argument("--api-key", default=os.environ.get("TOKENMILL_API_KEY"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("serve_args", nargs="*", help="extra `tokenmill serve` arguments (after --)")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    proc = None
    url = args.url.rstrip("/") if args.url else None
    if url is None:
        serve_args = (["--model", args.model] if args.model else []) + args.serve_args
        proc, url, log = start_server(serve_args, args.startup_timeout)
        print(f"server {url} (log {log})")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    stop = threading.Event()
    try:
        ids = [m["id"] for m in httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"]]
        model = "auto" if "auto" in ids else ids[0]  # a multi-model config: let the router spread the traffic
        pool = ThreadPoolExecutor(args.concurrency)
        futures = [pool.submit(traffic, url, model, stop, i, headers) for i in range(args.concurrency)]
        print(f"traffic to {model} for {args.seconds:.0f} s ...")
        time.sleep(args.seconds)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": args.width, "height": 900}, device_scale_factor=1)
            if args.api_key:
                page.add_init_script(f"localStorage.setItem('tokenmill-api-key', {args.api_key!r})")
            page.goto(f"{url}/dashboard?window={args.window}")
            page.wait_for_function("window.tokenmillDashboard && window.tokenmillDashboard.updates >= 2",
                                   timeout=30_000)
            page.wait_for_timeout(1500)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        stop.set()
        print(f"{sum(f.result() for f in futures)} requests; screenshot: {args.out}")
        pool.shutdown()
    finally:
        stop.set()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
