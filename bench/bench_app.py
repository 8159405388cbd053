"""App benchmark (tiny models): click-to-overlay latency, time to first streamed token, memory at rest.

The app runs as its own process (`python -m app --tiny`), as a user would start it, so its RSS is its own.
Measured side by side in one run:
  service  - `ChatService.click` / `.stream` in this process, no web stack: the floor the app adds to.
  api      - the same through `gradio_client` over HTTP (queue, SSE, JSON, PNG overlay encoding).
  browser  - what a person sees, in headless Chromium: mouse click -> the new overlay image is shown, and
             Enter -> the first answer text is shown (skipped when Playwright or Chromium is missing).
Every latency is the median over `--clicks` clicks (after a first, warm-up click) or `--questions` questions.

Usage: python bench/bench_app.py [--clicks 20] [--questions 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_tokenizer import cpu_name, emit  # noqa: E402

SCENE = str(ROOT / "examples" / "scene.jpg")
# Points spread over the example picture; each click adds a region (as a user clicking around would).
POINTS = [(80 + (i * 97) % 800, 60 + (i * 53) % 600) for i in range(64)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_app(data: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "app", "--tiny", "--data-dir", str(data), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    for line in proc.stdout:  # the startup line, then Gradio's "Running on local URL"
        if "Running on local URL" in line:
            return proc, url
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("the app did not start")


def service_section(args: argparse.Namespace) -> dict:
    from app.config import AppConfig
    from app.service import ChatService
    from assistant.engine import Assistant
    from assistant.store import ChatStore
    data = Path(tempfile.mkdtemp(prefix="tapchat-bench-"))
    config = AppConfig(data_dir=data, tiny=True)
    service = ChatService(Assistant.tiny(store=ChatStore(config.db_path, config.image_dir)), config)
    cid = service.new_chat("bench")
    service.set_image("bench", cid, SCENE)
    service.click("bench", cid, *POINTS[0])
    clicks = []
    for x, y in POINTS[1:args.clicks + 1]:
        t0 = time.perf_counter()
        service.click("bench", cid, x, y)
        service.overlay("bench", cid)
        clicks.append(time.perf_counter() - t0)
    ttft = []
    for i in range(args.questions):
        qid = service.new_chat("bench")
        service.set_image("bench", qid, SCENE)
        t0 = time.perf_counter()
        stream = service.stream("bench", qid, f"Question {i}: what is in the picture?", max_new_tokens=16)
        next(iter(stream))
        ttft.append(time.perf_counter() - t0)
        stream.text()
    shutil.rmtree(data, ignore_errors=True)
    return {"click_to_overlay_ms": 1000 * statistics.median(clicks), "ttft_ms": 1000 * statistics.median(ttft)}


def api_section(url: str, args: argparse.Namespace) -> dict:
    from gradio_client import Client, handle_file
    client = Client(url, verbose=False)
    cid = client.predict(api_name="/new_chat")
    client.predict(cid, handle_file(SCENE), api_name="/set_image")
    client.predict(cid, {"points": [list(POINTS[0])]}, api_name="/segment")
    clicks = []
    for x, y in POINTS[1:args.clicks + 1]:
        t0 = time.perf_counter()
        client.predict(cid, {"points": [[x, y]]}, api_name="/segment")
        clicks.append(time.perf_counter() - t0)
    ttft = []
    for i in range(args.questions):
        qid = client.predict(api_name="/new_chat")
        client.predict(qid, handle_file(SCENE), api_name="/set_image")
        t0 = time.perf_counter()
        job = client.submit(qid, f"Question {i}: what is in the picture?", 0.0, 16, api_name="/chat")
        for _ in job:
            ttft.append(time.perf_counter() - t0)
            break
        job.result()
    # The same clicks while another user's 1024-token answer streams (separate queue lanes + the fair engine lock)
    other = Client(url, verbose=False)
    oid = other.predict(api_name="/new_chat")
    other.predict(oid, handle_file(SCENE), api_name="/set_image")
    busy = []
    for x, y in POINTS[args.clicks + 1:2 * args.clicks + 1]:
        job = other.submit(oid, "Tell me a very long story.", 0.0, 1024, api_name="/chat")
        for _ in job:  # streaming has started
            break
        t0 = time.perf_counter()
        client.predict(cid, {"points": [[x, y]]}, api_name="/segment")
        busy.append(time.perf_counter() - t0)
        other.predict(oid, api_name="/stop")
        job.result()
        other.predict(oid, api_name="/clear")
    return {"segment_ms": 1000 * statistics.median(clicks), "ttft_ms": 1000 * statistics.median(ttft),
            "segment_while_streaming_ms": 1000 * statistics.median(busy),
            "streaming_over_alone": statistics.median(busy) / statistics.median(clicks)}


def browser_section(url: str, args: argparse.Namespace) -> dict | None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        return None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)

        def new_chat_with_image() -> None:
            count = page.locator("#history button").count()
            page.locator("#new_chat").click()
            page.wait_for_function("() => !document.querySelector('#image img')")
            page.locator("#image input[type=file]").set_input_files(SCENE)
            page.wait_for_function("n => document.querySelectorAll('#history button').length > n", arg=count)
            page.wait_for_function("() => document.querySelector('#image img')?.naturalWidth > 0")

        new_chat_with_image()

        def click(x: float, y: float) -> float:
            img = page.locator("#image img").first
            src = img.get_attribute("src")
            box = img.bounding_box()
            nw, nh = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
            s = min(box["width"] / nw, box["height"] / nh, 1)
            ox, oy = (box["width"] - nw * s) / 2, (box["height"] - nh * s) / 2
            t0 = time.perf_counter()
            page.mouse.click(box["x"] + ox + x * s, box["y"] + oy + y * s)
            page.wait_for_function("old => { const i = document.querySelector('#image img');"
                                   " return i && i.src !== old && i.complete && i.naturalWidth > 0; }", arg=src)
            return time.perf_counter() - t0

        click(*POINTS[0])
        clicks = [click(x, y) for x, y in POINTS[1:args.clicks + 1]]
        ttft = []
        for i in range(args.questions):
            new_chat_with_image()
            bots = page.get_by_test_id("bot").count()
            page.locator("#msg textarea").fill(f"Question {i}: what is in the picture?")
            t0 = time.perf_counter()
            page.locator("#msg textarea").press("Enter")
            page.wait_for_function("n => { const b = document.querySelectorAll('[data-testid=bot]');"
                                   " return b.length > n && b[b.length - 1].innerText.replace('▌', '').trim(); }",
                                   arg=bots)
            ttft.append(time.perf_counter() - t0)
            page.get_by_test_id("submit-button").wait_for()
        browser.close()
    return {"click_to_overlay_ms": 1000 * statistics.median(clicks), "ttft_ms": 1000 * statistics.median(ttft)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results: dict = {"machine": cpu_name()}
    results["service"] = service_section(args)
    data = Path(tempfile.mkdtemp(prefix="tapchat-bench-app-"))
    proc, url = start_app(data)
    try:
        time.sleep(2)
        results["rss_at_start_mb"] = rss_mb(proc.pid)
        results["api"] = api_section(url, args)
        results["browser"] = browser_section(url, args)
        time.sleep(2)
        results["rss_after_use_mb"] = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)
    emit(results, args.json)


if __name__ == "__main__":
    main()
