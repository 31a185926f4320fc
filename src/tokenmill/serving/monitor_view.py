"""``tokenmill monitor URL``: a live terminal view of a server's ``GET /v1/monitor``.

Shows a table per model (health, throughput, latency, queue, KV cache, cache hit rates), a system line and the
server's findings. ``render_snapshot`` turns one /v1/monitor JSON document into a rich renderable and knows nothing
about HTTP; ``cmd_monitor`` fetches (httpx) and redraws (rich.live) every ``--interval`` seconds.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import httpx
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..argtypes import positive_float

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
STATUS_STYLE = {"ok": "bold green", "loading": "bold yellow", "draining": "bold yellow", "failed": "bold red",
                "dead": "bold red"}
PRIORITY_STYLE = {"high": "bold red", "medium": "bold yellow", "low": "cyan"}
DASH = "-"


# ---- formatting ---------------------------------------------------------------------------------------------------
def _num(v: float | None) -> str:
    if v is None:
        return DASH
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _secs(v: float | None) -> str:
    if v is None:
        return DASH
    return f"{v:.2f} s" if v >= 1 else f"{_num(v * 1000)} ms"


def _pct(v: float | None) -> str:
    return DASH if v is None else f"{v * 100:.0f}%"


def _bytes(v: float | None) -> str:
    if v is None:
        return DASH
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024:
            return f"{_num(v)} {unit}"
        v /= 1024
    return f"{_num(v)} TiB"


def _int(v: float | None) -> str:
    return DASH if v is None else f"{v:g}"


def _evidence(ev: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={DASH if v is None else v}"
                     for k, v in (ev or {}).items())


# ---- rendering ----------------------------------------------------------------------------------------------------
COLUMNS = ["status", "tok/s", "req/s", "TTFT p50", "TTFT p99", "ITL p50", "queue", "running", "KV use", "preempt/min",
           "prefix hit", "resp. hit"]


def _model_cells(m: dict[str, Any]) -> list[Text | str]:
    h, c = m.get("health") or {}, m.get("current") or {}
    status = h.get("status") or "unknown"
    return [Text(status, style=STATUS_STYLE.get(status, "")), _num(c.get("output_tokens_per_s")),
            _num(c.get("requests_per_s")), _secs(c.get("ttft_p50_s")), _secs(c.get("ttft_p99_s")),
            _secs(c.get("itl_p50_s")), _int(c.get("queue_depth")), _int(c.get("running")),
            _pct(c.get("kv_cache_usage")), _num(c.get("preemptions_per_min")), _pct(c.get("prefix_cache_hit_rate")),
            _pct(c.get("response_cache_hit_rate"))]


def _model_label(name: str, m: dict[str, Any]) -> Text:
    h = m.get("health") or {}
    label = Text(name, style="bold")
    if h.get("aliases"):
        label.append(f" ({', '.join(h['aliases'])})", style="dim")
    if h.get("fallback"):
        label.append(f" -> {h['fallback']}", style="dim")
    label.append(f" · queue bound {h['max_queued_requests']}" if h.get("max_queued_requests") else "", style="dim")
    return label


class _ModelsView:
    """The per-model table: one row per model when the terminal is wide enough, else one column per model."""

    def __init__(self, models: dict[str, dict[str, Any]]) -> None:
        self.models = models

    def wide(self) -> Table:
        t = Table(title="models", title_justify="left", header_style="bold")
        t.add_column("model", min_width=12, overflow="fold")
        for name in COLUMNS:
            t.add_column(name, justify="left" if name == "status" else "right", no_wrap=True)
        for name, m in self.models.items():
            t.add_row(_model_label(name, m), *_model_cells(m))
        if not self.models:
            t.add_row(Text("no models", style="dim"), *[""] * len(COLUMNS))
        return t

    def narrow(self) -> Table:
        t = Table(title="models", title_justify="left", header_style="bold")
        t.add_column("", style="dim", no_wrap=True)
        cells = {name: _model_cells(m) for name, m in self.models.items()}
        for name, m in self.models.items():
            t.add_column(_model_label(name, m), justify="right", overflow="fold")
        for i, metric in enumerate(COLUMNS):
            t.add_row(metric, *[cells[name][i] for name in self.models])
        if not self.models:
            t.add_row("no models")
        return t

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # the wide table needs every metric column at full width (they don't wrap) plus 12 for the model names
        rows = [COLUMNS] + [[str(c) for c in _model_cells(m)] for m in self.models.values()]
        need = 12 + sum(max(len(r[i]) for r in rows) for i in range(len(COLUMNS))) + 3 * (len(COLUMNS) + 1) + 1
        yield self.wide() if need <= options.max_width or not self.models else self.narrow()


def render_snapshot(data: dict[str, Any], source: str | None = None) -> RenderableType:
    """One /v1/monitor document as a rich renderable: title, per-model table, system line, findings."""
    when = data.get("time")
    title = Text("tokenmill monitor", style="bold")
    if source:
        title.append(f"  {source}", style="dim")
    if when is not None:
        title.append(f"  updated {time.strftime('%H:%M:%S', time.localtime(when))}", style="dim")
    if data.get("window_s") is not None:
        title.append(f"  window {data['window_s']:g} s", style="dim")

    models = _ModelsView(data.get("models") or {})
    errors = [Text(f"{name}: {(m.get('health') or {})['error']}", style="red")
              for name, m in (data.get("models") or {}).items() if (m.get("health") or {}).get("error")]

    sysc = ((data.get("system") or {}).get("current")) or {}
    system = Text()
    system.append("system  ", style="bold")
    system.append(f"CPU {_pct(sysc.get('cpu_util'))}  ")
    if sysc.get("gpu_util") is not None or sysc.get("gpu_memory_used_bytes") is not None:
        system.append(f"GPU {_pct(sysc.get('gpu_util'))} ({_bytes(sysc.get('gpu_memory_used_bytes'))})  ")
    rss = f"RSS {_bytes(sysc.get('memory_rss_bytes'))}"
    if sysc.get("memory_total_bytes"):
        rss += f" of {_bytes(sysc['memory_total_bytes'])}"
    system.append(rss)

    findings = data.get("findings") or []
    if findings:
        table = Table(title="findings", title_justify="left", header_style="bold", expand=False)
        table.add_column("priority", no_wrap=True)
        table.add_column("model")
        table.add_column("issue")
        table.add_column("fix")
        for f in findings:
            p = f.get("priority") or "low"
            issue = Text(f.get("issue") or f.get("kind") or "")
            if f.get("evidence"):
                issue.append(f"\n{_evidence(f['evidence'])}", style="dim")
            table.add_row(Text(p, style=PRIORITY_STYLE.get(p, "")), f.get("model") or "(server)", issue,
                          f.get("fix") or "")
        findings_view: RenderableType = table
    else:
        findings_view = Text("findings: none, nothing looks wrong in this window", style="green")
    return Group(title, models, *errors, system, Text(""), findings_view)


# ---- fetching -----------------------------------------------------------------------------------------------------
class MonitorError(Exception):
    """The server could not be reached or gave no usable /v1/monitor answer (the message says which)."""


def base_url(url: str) -> str:
    """Normalise what a user types (host:port, a trailing /, /v1 or /v1/monitor) to the server's base URL."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    for suffix in ("/v1/monitor", "/v1", "/dashboard"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


def fetch_snapshot(client: httpx.Client, url: str, window: float | None = None) -> dict[str, Any]:
    """GET {url}/v1/monitor; raises MonitorError with a readable message."""
    target = f"{url}/v1/monitor"
    params = {"window": f"{window:g}"} if window is not None else None
    try:
        r = client.get(target, params=params)
    except httpx.HTTPError as e:
        raise MonitorError(f"cannot reach {target}: {e or type(e).__name__}") from e
    if r.status_code == 401:
        raise MonitorError(f"{target} refused the API key (HTTP 401); pass --api-key or set TOKENMILL_API_KEY")
    if r.status_code == 404:
        raise MonitorError(f"{target} not found (HTTP 404): is this a tokenmill server with the monitor?")
    if r.status_code != 200:
        raise MonitorError(f"{target} answered HTTP {r.status_code}: {r.text[:300]}")
    try:
        data = r.json()
    except ValueError as e:
        raise MonitorError(f"{target} did not answer JSON: {r.text[:200]!r}") from e
    if not isinstance(data, dict):
        raise MonitorError(f"{target} answered {type(data).__name__}, expected a JSON object")
    return data


# ---- the command --------------------------------------------------------------------------------------------------


def add_monitor_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``tokenmill monitor`` to the CLI's subparsers."""
    p = sub.add_parser("monitor", help="live terminal view of a running server (its /v1/monitor)",
                       description="Polls GET /v1/monitor of a tokenmill server and shows per-model throughput, "
                                   "latency, queue and KV-cache use, system load and the server's findings. "
                                   "The same data drives the web dashboard at /dashboard.")
    p.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"server base URL (default {DEFAULT_URL})")
    p.add_argument("--interval", type=positive_float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--window", type=positive_float, default=None, help="seconds of history the server summarises "
                                                                  "(default: the server's)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit (1 if the server can't be "
                                                       "reached)")
    p.add_argument("--json", action="store_true", help="print the raw /v1/monitor JSON (implies --once)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: "
                                                   "$TOKENMILL_API_KEY)")
    p.add_argument("--timeout", type=positive_float, default=5.0, help="HTTP timeout in seconds (default 5)")
    p.set_defaults(func=cmd_monitor)
    return p


def cmd_monitor(args: argparse.Namespace) -> int:
    url = base_url(args.url)
    key = args.api_key if args.api_key is not None else os.environ.get("TOKENMILL_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    console = Console()
    if not console.is_terminal:  # piped: don't squeeze the tables into 80 columns
        console = Console(width=max(console.width, 160))
    err = Console(stderr=True)
    with httpx.Client(headers=headers, timeout=args.timeout) as client:
        if args.once or args.json:
            try:
                data = fetch_snapshot(client, url, args.window)
            except MonitorError as e:
                err.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
                return 1
            if args.json:
                sys.stdout.write(json.dumps(data, indent=2) + "\n")
            else:
                console.print(render_snapshot(data, source=url))
            return 0
        return _live(console, client, url, args.window, args.interval)


def _live(console: Console, client: httpx.Client, url: str, window: float | None, interval: float) -> int:
    last: RenderableType | None = None
    with Live(Text(f"connecting to {url} ..."), console=console, refresh_per_second=4, screen=False,
              auto_refresh=False) as live:
        try:
            while True:
                started = time.monotonic()
                try:
                    last = render_snapshot(fetch_snapshot(client, url, window), source=url)
                    live.update(last, refresh=True)
                except MonitorError as e:
                    logger.debug("monitor fetch failed: %s", e)
                    note = Text(f"disconnected: {e}; retrying every {interval:g} s", style="bold red")
                    live.update(Group(note, last) if last is not None else note, refresh=True)
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
        except KeyboardInterrupt:
            pass
    return 0
