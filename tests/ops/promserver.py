"""A real Prometheus (Debian package ``prometheus``) for tests: loopback, free port, temp storage.

``ensure_prometheus()`` installs the package when the binaries are missing (the suite runs as root,
like ``make system-deps`` for SIPp); ``PrometheusProcess`` starts it with a scrape config for one edge
and the rule files given, and stops it by PID.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
from edgeproc import free_port, wait_ready


def ensure_prometheus() -> str | None:
    """Paths are found or installed; returns a reason string if that is impossible."""
    if shutil.which("prometheus") and shutil.which("promtool"):
        return None
    if os.geteuid() != 0:
        return "Debian package prometheus is not installed and the tests do not run as root to install it"
    if not shutil.which("apt-get"):
        return "Debian package prometheus is not installed and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=300)
        # services do not start in containers (policy-rc.d); elsewhere the package's own service may start
        # on :9090, which the tests never use
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"], env=env,
                       check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        out = getattr(exc, "stderr", b"") or b""
        return f"installing Debian package prometheus failed: {exc} {out.decode(errors='replace')[-500:]}"
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        return "Debian package prometheus installed but prometheus/promtool are not on PATH"
    return None


class PrometheusProcess:
    """``prometheus`` scraping ``target`` (host:port) every second, evaluating ``rule_files`` every second."""

    def __init__(self, tmp: Path, target: str, rule_files: list[Path] = (), job: str = "sipedge") -> None:
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.target = target
        self.job = job
        rules = "".join(f"  - {Path(f).resolve()}\n" for f in rule_files)
        self.config = self.tmp / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            + (f"rule_files:\n{rules}" if rules else "")
            + f"scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = self.tmp / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> PrometheusProcess:
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.config}", f"--storage.tsdb.path={self.tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.tmp,
        )
        try:
            wait_ready(self.proc, self.base + "/-/ready", self.log, timeout, "prometheus")
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> PrometheusProcess:
        # ``with prom.start():`` must not start a second server: it would find the first one
        # ready on the same port, and the first would outlive stop() (left running)
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ API

    def api(self, path: str, **params: str) -> dict:
        r = httpx.get(self.base + path, params=params, timeout=10.0)
        body = r.json()
        if body.get("status") != "success":
            raise PromQLError(body.get("errorType", r.status_code), body.get("error", r.text))
        return body["data"]

    def query(self, expr: str) -> dict:
        """An instant query at now: ``{"resultType": ..., "result": ...}``; raises PromQLError."""
        return self.api("/api/v1/query", query=expr)

    def last_scrape(self) -> float:
        """Timestamp of the newest sample of ``up`` for the edge (0 before the first scrape)."""
        res = self.query(f'timestamp(up{{job="{self.job}"}} == 1)')["result"]
        return float(res[0]["value"][1]) if res else 0.0

    def wait_scrapes_after(self, t: float, scrapes: int = 2, timeout: float = 20.0) -> None:
        """Until the edge was scraped successfully ``scrapes`` times after wall-clock time ``t``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.last_scrape() >= t + scrapes - 1:
                return
            time.sleep(0.2)
        raise TimeoutError(f"no successful scrape of {self.target} after {t}:\n{self.log.read_text()[-2000:]}")


class PromQLError(Exception):
    pass


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)")


def with_bool(expr: str) -> str:
    """``expr`` with ``bool`` after every comparison operator outside label matchers, strings and ranges.

    A filtering comparison (``a > 0.9``) keeps only the series that pass; ``a > bool 0.9`` keeps every
    series that the two sides *match* and returns 0/1. So the rewritten alert expression returns series
    exactly when the metrics exist and the vector matching of the rule (``on``, ``and``, division) pairs
    them up, whether or not the alert would fire now. Set operators (``and``, ``or``) are kept; rules
    that use ``unless`` cannot be checked this way (none does).
    """
    out: list[str] = []
    i, n = 0, len(expr)
    depth_brace = depth_bracket = 0
    quote: str | None = None
    while i < n:
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(expr[i + 1])
                i += 2
                continue
            if c == quote:
                quote = None
            i += 1
            continue
        if c in "\"'`":
            quote = c
        elif c == "{":
            depth_brace += 1
        elif c == "}":
            depth_brace -= 1
        elif c == "[":
            depth_bracket += 1
        elif c == "]":
            depth_bracket -= 1
        elif depth_brace == 0 and depth_bracket == 0:
            m = _COMPARISON.match(expr, i)
            if m:
                op = m.group(1)
                out.append(op)
                i += len(op)
                if not re.match(r"\s*bool\b", expr[i:]):
                    out.append(" bool")
                continue
        out.append(c)
        i += 1
    return "".join(out)
