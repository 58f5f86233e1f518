"""pjsua2 user agents for end-to-end tests, one per subprocess.

pjsua2 keeps one global ``Endpoint`` per process and runs its own threads, so each
:class:`PjUA` spawns this file as a child process (``python pjua.py --child``) and
drives it over a line-based JSON protocol:

* parent -> child, one line per command: ``{"id": 7, "cmd": "call", "args": {...}}``
* child -> parent, a reply per command: ``{"id": 7, "ok": true, "result": ...}``
  (or ``"ok": false, "error": "..."``), and asynchronous events:
  ``{"event": "reg_state" | "call_state" | "media" | "incoming" | "rx" | "dtmf", ...}``.

The child runs pjsua with ``mainThreadOnly`` and ``threadCnt = 0`` and polls
``libHandleEvents`` itself, so every pjsua2 callback runs on the child's main thread.
Audio uses pjmedia's null device: a looping WAV tone is played into each call and the
remote audio is recorded to a WAV file, which :func:`goertzel` / :func:`hears_tone`
analyse. The child's real stdout is the protocol channel; file descriptor 1 is pointed
at the pjsip log file so nothing pjsip prints can corrupt the protocol.

Every wait has a timeout. :meth:`PjUA.close` always ends the child (quit, then kill),
and the child also exits on stdin EOF (parent gone) or after ``max_lifetime`` seconds.
"""

from __future__ import annotations

import json
import math
import os
import queue
import struct
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path
from typing import Any

__all__ = ["PjUA", "UAPool", "pjua_fixture", "CallHandle", "provision_profile", "edge_registrar", "PjUAError",
           "goertzel", "hears_tone", "tone_powers", "parse_sip_headers"]

STATES = ("NULL", "CALLING", "INCOMING", "EARLY", "CONNECTING", "CONFIRMED", "DISCONNECTED")
_COMPACT = {"f": "from", "t": "to", "i": "call-id", "v": "via", "m": "contact", "l": "content-length",
            "c": "content-type", "k": "supported", "s": "subject", "e": "content-encoding", "o": "event",
            "r": "refer-to", "b": "referred-by", "u": "allow-events", "x": "session-expires"}


class PjUAError(RuntimeError):
    """The child failed a command, died, or a wait timed out."""


def parse_sip_headers(raw: str) -> tuple[str, dict[str, list[str]]]:
    """Split a raw SIP message into its start line and ``{lower-case long name: [values]}``.

    Compact forms are expanded (RFC 3261 §7.3.3) and folded lines joined. Values are
    kept per header line (a line with several comma-separated values stays one item).
    """
    head = raw.replace("\r\n", "\n").split("\n\n", 1)[0]
    lines = head.split("\n")
    start = lines[0].strip() if lines else ""
    headers: dict[str, list[str]] = {}
    last: str | None = None
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and last is not None:  # RFC 3261 §7.3.1 folding
            headers[last][-1] += " " + line.strip()
            continue
        if ":" not in line:
            continue
        name, value = line.split(":", 1)
        key = name.strip().lower()
        key = _COMPACT.get(key, key)
        headers.setdefault(key, []).append(value.strip())
        last = key
    return start, headers


def _uri_user(value: str) -> str:
    """The user part of a name-addr or URI (``"x" <sip:+4420@h>;tag=1`` -> ``+4420``)."""
    if "<" in value:
        value = value.split("<", 1)[1].split(">", 1)[0]
    value = value.strip()
    for scheme in ("sips:", "sip:", "tel:"):
        if value.lower().startswith(scheme):
            value = value[len(scheme):]
            break
    if "@" in value:
        return value.split("@", 1)[0].split(";", 1)[0]
    return "" if ":" in value or "." in value else value.split(";", 1)[0]


# --------------------------------------------------------------------------------------
# Tone analysis (no numpy): Goertzel over the recorded WAV
# --------------------------------------------------------------------------------------

def _read_wav_mono(path: str | os.PathLike[str]) -> tuple[int, list[float]]:
    """Samples of a 16-bit PCM WAV as floats, first channel. Tolerates a header whose
    sizes were never finalised (recorder killed): then the data runs to end of file."""
    data = Path(path).read_bytes()
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a WAV file")
    pos = 12
    rate, channels, bits, pcm = 8000, 1, 16, b""
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = pos + 8
        if cid == b"fmt ":
            _fmt, channels, rate, _br, _ba, bits = struct.unpack("<HHIIHH", data[body:body + 16])
        elif cid == b"data":
            end = body + size if size and body + size <= len(data) else len(data)
            pcm = data[body:end]
            break
        pos = body + size + (size & 1)
    if bits != 16:
        raise ValueError(f"{path}: {bits}-bit WAV, expected 16")
    frame = 2 * channels
    n = len(pcm) // frame
    samples = struct.unpack(f"<{n * channels}h", pcm[: n * frame]) if n else ()
    return rate, [float(s) for s in samples[::channels]]


def tone_powers(wav_path: str | os.PathLike[str], freqs: list[float], *, block_ms: int = 100,
                skip_ms: int = 200, silence_rms: float = 30.0) -> dict[float, float]:
    """Fraction of the recording's energy at each frequency (0..1), by Goertzel per block.

    A pure sine at ``f`` gives ~1.0 for ``f`` and ~0 for others; silence gives 0. Blocks
    quieter than ``silence_rms`` (and the first ``skip_ms``) are left out, so a late
    answer or a hold does not dilute the figure.
    """
    rate, x = _read_wav_mono(wav_path)
    n = max(1, rate * block_ms // 1000)
    start = rate * skip_ms // 1000
    num = {f: 0.0 for f in freqs}
    energy_total = 0.0
    coeffs = {f: 2.0 * math.cos(2.0 * math.pi * f / rate) for f in freqs}
    for b in range(start, len(x) - n + 1, n):
        block = x[b:b + n]
        energy = sum(v * v for v in block)
        if energy / n < silence_rms * silence_rms:
            continue
        energy_total += energy
        for f, c in coeffs.items():
            s1 = s2 = 0.0
            for v in block:
                s0 = v + c * s1 - s2
                s2, s1 = s1, s0
            power = s1 * s1 + s2 * s2 - c * s1 * s2  # |X(f)|^2
            num[f] += 2.0 * power / n
    if energy_total <= 0.0:
        return {f: 0.0 for f in freqs}
    return {f: num[f] / energy_total for f in freqs}


def goertzel(wav_path: str | os.PathLike[str], freq: float) -> float:
    """Relative power (fraction of the energy, 0..1) of ``freq`` in a recorded WAV."""
    return tone_powers(wav_path, [freq])[freq]


def hears_tone(wav_path: str | os.PathLike[str], freq: float, other_freq: float | None = None, *,
               min_power: float = 0.2, min_ratio: float = 10.0) -> bool:
    """True when ``freq`` carries at least ``min_power`` of the energy and, if
    ``other_freq`` is given, at least ``min_ratio`` times the power at ``other_freq``."""
    freqs = [freq] + ([other_freq] if other_freq is not None else [])
    p = tone_powers(wav_path, freqs)
    if p[freq] < min_power:
        return False
    return other_freq is None or p[freq] >= min_ratio * max(p[other_freq], 1e-9)


def write_tone_wav(path: str | os.PathLike[str], freq: float, *, rate: int = 16000, seconds: float = 1.0,
                   amplitude: float = 0.3) -> None:
    """A mono 16-bit sine WAV of whole periods (loops without a click)."""
    n = int(rate * seconds)
    if freq > 0:
        periods = max(1, round(freq * seconds))
        n = int(round(periods * rate / freq))
    amp = int(32767 * amplitude)
    frames = struct.pack(f"<{n}h", *(int(amp * math.sin(2 * math.pi * freq * i / rate)) for i in range(n)))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)


# --------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------

class CallHandle:
    """One call in a :class:`PjUA` child, outgoing or incoming. State is fed by events."""

    def __init__(self, ua: PjUA, hid: int, direction: str, info: dict[str, Any] | None = None) -> None:
        self.ua = ua
        self.id = hid
        self.direction = direction
        #: for incoming calls: ``ruri``, ``to``, ``from``, ``ruri_user``, ``to_user``, ``headers``, ``src``
        self.info: dict[str, Any] = info or {}
        self.states: list[str] = []
        self.state = "NULL"
        self.last_status: int = 0
        self.last_reason: str = ""
        self.media_status = "NONE"
        self.media_history: list[str] = []
        #: responses received for this call's transactions: dicts with code, reason, headers,
        #: cseq_method. pjsua answers 401/407 challenges itself and does not report them here.
        self.responses: list[dict[str, Any]] = []
        #: requests received inside this call (BYE, re-INVITE, ...): dicts with method, headers
        self.requests: list[dict[str, Any]] = []
        self.dtmf: str = ""
        self.record_wav: str | None = None
        self.connect_time: float | None = None
        self.disconnect_time: float | None = None

    def __repr__(self) -> str:
        return f"<CallHandle {self.ua.name}#{self.id} {self.direction} {self.state} {self.last_status}>"

    def _update(self, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if kind == "call_state":
            self.state = ev["state"]
            self.states.append(self.state)
            self.last_status = ev.get("status", self.last_status)
            self.last_reason = ev.get("reason", self.last_reason)
            if self.state == "CONFIRMED" and self.connect_time is None:
                self.connect_time = ev.get("t")
            if self.state == "DISCONNECTED":
                self.disconnect_time = ev.get("t")
        elif kind == "media":
            self.media_status = ev["status"]
            self.media_history.append(self.media_status)
        elif kind == "rx":
            (self.responses if "code" in ev else self.requests).append(ev)
        elif kind == "dtmf":
            self.dtmf += ev["digit"]

    def wait_state(self, state: str, timeout: float = 10.0) -> str:
        """Wait until the call has been in ``state`` (or any of ``"A|B"``); returns the state
        reached. Raises :class:`PjUAError` on timeout, or when the call ended first."""
        wanted = set(state.upper().split("|"))
        def done() -> bool:
            return bool(wanted & set(self.states)) or "DISCONNECTED" in self.states
        self.ua._wait_for(done, timeout, f"call {self.id} state {state}")
        hit = wanted & set(self.states)
        if not hit:
            raise PjUAError(f"call {self.id} ended ({self.last_status} {self.last_reason}) before {state}")
        return next(s for s in self.states if s in hit)

    def wait_media(self, status: str, timeout: float = 10.0) -> None:
        """Wait for a media status: ``ACTIVE``, ``LOCAL_HOLD``, ``REMOTE_HOLD``, ``NONE``, ``ERROR``."""
        self.ua._wait_for(lambda: self.media_status == status.upper(), timeout,
                          f"call {self.id} media {status} (now {self.media_status})")

    def wait_dtmf(self, digits: str, timeout: float = 10.0) -> None:
        self.ua._wait_for(lambda: digits in self.dtmf, timeout, f"call {self.id} DTMF {digits!r} (got {self.dtmf!r})")

    def wait_response(self, code: int, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until a response with ``code`` arrived for this call; returns it."""
        def find() -> dict[str, Any] | None:
            return next((r for r in self.responses if r["code"] == code), None)
        self.ua._wait_for(lambda: find() is not None, timeout, f"call {self.id} response {code}")
        found = find()
        assert found is not None
        return found

    @property
    def final_response(self) -> dict[str, Any] | None:
        """The last final (>= 200) response received for the call's INVITE, if any."""
        finals = [r for r in self.responses if r["code"] >= 200 and r.get("cseq_method") == "INVITE"]
        return finals[-1] if finals else None

    @property
    def active(self) -> bool:
        return self.state not in ("NULL", "DISCONNECTED")

    def hold(self) -> None:
        self.ua._cmd("hold", h=self.id)

    def unhold(self) -> None:
        self.ua._cmd("unhold", h=self.id)

    def answer(self, code: int = 200) -> None:
        """Answer (or reject, code >= 300) an incoming call that was left ringing."""
        self.ua._cmd("answer", h=self.id, code=code)

    def hangup(self, code: int = 0, timeout: float = 10.0, wait: bool = True) -> None:
        """Hang up (BYE, CANCEL, or reject with ``code`` for an unanswered incoming call)."""
        if self.state == "DISCONNECTED":
            return
        self.ua._cmd("hangup", h=self.id, code=code)
        if wait:
            self.ua._wait_for(lambda: self.state == "DISCONNECTED", timeout, f"call {self.id} hangup")

    def send_dtmf(self, digits: str) -> None:
        """RFC 4733 telephone-events (pjsua's default DTMF method)."""
        self.ua._cmd("dtmf", h=self.id, digits=digits)

    def stats(self) -> dict[str, Any]:
        """RTP counters of the call's audio stream (rx/tx packets, loss, jitter)."""
        return self.ua._cmd("stats", h=self.id)


class PjUA:
    """A pjsua2 user agent in its own subprocess.

    :param name: label used in logs and the default SIP user.
    :param bind: local address for SIP and RTP.
    :param port: SIP port (0 = any free port; see :attr:`port`).
    :param transport: ``"udp"`` or ``"tcp"``.
    :param null_audio: use the null audio device (always true in tests).
    :param log_dir: where the pjsip log goes (default: a temp dir; see :attr:`log_path`).
    :param log_level: pjsip log level for the file (4 logs every SIP message).
    :param media_port: first RTP port (0 = derived from the child's pid).
    :param max_lifetime: the child exits on its own after this many seconds.
    """

    def __init__(self, name: str = "ua", bind: str = "127.0.0.1", port: int = 0, transport: str = "udp",
                 null_audio: bool = True, *, log_dir: str | os.PathLike[str] | None = None, log_level: int = 4,
                 media_port: int = 0, user_agent: str | None = None, max_calls: int = 32,
                 max_lifetime: float = 900.0, start_timeout: float = 15.0) -> None:
        self.name = name
        self.bind = bind
        self.transport = transport.lower()
        if self.transport not in ("udp", "tcp"):
            raise ValueError("transport must be 'udp' or 'tcp'")
        self._own_dir = None if log_dir else tempfile.mkdtemp(prefix=f"pjua-{name}-")
        self.dir = Path(log_dir or self._own_dir)  # type: ignore[arg-type]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / f"pjsip-{name}.log"
        self.calls: list[CallHandle] = []
        self.incoming_calls: list[CallHandle] = []
        self.reg_events: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._calls_by_id: dict[int, CallHandle] = {}
        self._replies: dict[int, dict[str, Any]] = {}
        self._next_id = 1
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._closed = False
        self._registered = False
        self._stderr_path = self.dir / f"child-{name}.stderr"
        cfg = {"name": name, "bind": bind, "port": port, "transport": self.transport, "null_audio": null_audio,
               "log_path": str(self.log_path), "log_level": log_level, "media_port": media_port,
               "user_agent": user_agent or f"sipedge-test-pjua/{name}", "max_calls": max_calls,
               "max_lifetime": max_lifetime, "dir": str(self.dir)}
        self._stderr = open(self._stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self._reader = threading.Thread(target=self._read_loop, name=f"pjua-{name}", daemon=True)
        self._reader.start()
        try:
            ready = self._cmd("hello", timeout=start_timeout)
        except BaseException:
            self.close()
            raise
        self.port: int = ready["port"]
        #: ``sip:<name>@<bind>:<port>`` (with ``;transport=tcp`` on TCP): where this UA is reachable
        self.uri: str = f"sip:{name}@{_host(bind)}:{self.port}" + (";transport=tcp" if self.transport == "tcp" else "")
        self.contact = self.uri

    # ---- plumbing -------------------------------------------------------------------
    def _read_loop(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                if "id" in msg:
                    self._replies[msg["id"]] = msg
                else:
                    self._on_event(msg)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _on_event(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)
        kind = ev["event"]
        if kind == "reg_state":
            self.reg_events.append(ev)
        elif kind == "incoming":
            call = CallHandle(self, ev["h"], "in", ev)
            call.record_wav = ev.get("record_wav")
            self._calls_by_id[call.id] = call
            self.incoming_calls.append(call)
        elif "h" in ev:
            known = self._calls_by_id.get(ev["h"])
            if known is None:  # an outgoing call's events may overtake the reply to "call"
                known = self._calls_by_id[ev["h"]] = CallHandle(self, ev["h"], "out")
            known._update(ev)

    def _wait_for(self, pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PjUAError(f"{self.name}: timeout after {timeout}s waiting for {what}")
                if self._closed:
                    raise PjUAError(f"{self.name}: child exited while waiting for {what}; see {self._stderr_path}")
                self._cond.wait(min(left, 0.5))

    def _cmd(self, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
        with self._cond:
            if self._closed:
                raise PjUAError(f"{self.name}: child is gone (see {self._stderr_path})")
            rid = self._next_id
            self._next_id += 1
        line = (json.dumps({"id": rid, "cmd": cmd, "args": args}) + "\n").encode()
        try:
            with self._write_lock:
                assert self.proc.stdin is not None
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise PjUAError(f"{self.name}: child is gone ({exc}); see {self._stderr_path}") from exc
        self._wait_for(lambda: rid in self._replies, timeout, f"reply to {cmd}")
        with self._cond:
            reply = self._replies.pop(rid)
        if not reply.get("ok"):
            raise PjUAError(f"{self.name}: {cmd} failed: {reply.get('error')}")
        return reply.get("result")

    # ---- registration ---------------------------------------------------------------
    def register(self, registrar: str, username: str, password: str, domain: str = "sip.edge.test", *,
                 timeout: float = 10.0, expires: int = 300, proxy: str | None = None,
                 display_name: str = "") -> int:
        """REGISTER (with digest credentials, realm ``*``) and wait for the final status.

        Creates the UA's account ``sip:<username>@<domain>``; later :meth:`call`\\ s use it,
        with ``proxy`` (default: the registrar with ``;lr``) as outbound proxy so the INVITE
        goes to the edge whatever the request URI is. Returns the final status code
        (200, 401, 403, 408, ...); pjsua does not retry on failure.
        """
        before = len(self.reg_events)
        self._registered = True
        self._cmd("register", registrar=self._with_transport(registrar), username=username, password=password,
                  domain=domain, expires=expires, proxy=self._with_transport(proxy or _lr(registrar)),
                  display_name=display_name)
        self._wait_for(lambda: any(e["code"] >= 200 for e in self.reg_events[before:]), timeout,
                       f"REGISTER to {registrar}")
        return next(e["code"] for e in self.reg_events[before:] if e["code"] >= 200)

    def unregister(self, timeout: float = 10.0) -> int:
        """REGISTER with ``Expires: 0``; returns the final status code."""
        before = len(self.reg_events)
        self._cmd("unregister")
        self._wait_for(lambda: any(e["code"] >= 200 for e in self.reg_events[before:]), timeout, "unREGISTER")
        return next(e["code"] for e in self.reg_events[before:] if e["code"] >= 200)

    @property
    def last_reg(self) -> dict[str, Any] | None:
        """The last registration event: ``code``, ``reason``, ``expires``."""
        return self.reg_events[-1] if self.reg_events else None

    def _with_transport(self, uri: str | None) -> str | None:
        if uri is None or self.transport == "udp" or "transport=" in uri.lower():
            return uri
        return uri + ";transport=tcp"

    # ---- calls ----------------------------------------------------------------------
    def call(self, uri: str, *, from_user: str | None = None, domain: str | None = None,
             headers: dict[str, str] | None = None, auth: tuple[str, str] | None = None,
             proxy: str | None = None, tone_hz: float = 440.0, record_wav: str | os.PathLike[str] | None = None,
             use_registration: bool = True) -> CallHandle:
        """Place a call (returns at once; use :meth:`CallHandle.wait_state`).

        Without ``from_user``/``auth``/``proxy`` the call uses the registered account (if
        :meth:`register` was called and ``use_registration``), else the UA's local account
        (direct, peer-to-peer). With any of them, a non-registering account
        ``sip:<from_user>@<domain>`` with those credentials (realm ``*``) and outbound
        ``proxy`` is used, so the From user can differ from the auth username.

        :param tone_hz: sine played into the call (0 = silence).
        :param record_wav: where the remote audio is recorded (default: in the UA's dir).
        """
        if (self.transport == "tcp" and proxy is None and not (use_registration and self._registered)
                and "transport=" not in uri.lower()):
            uri = uri + ";transport=tcp"
        rec = str(record_wav) if record_wav else None
        hid = self._cmd("call", uri=uri, from_user=from_user, domain=domain, headers=headers or {},
                        auth=list(auth) if auth else None, proxy=self._with_transport(proxy), tone_hz=tone_hz,
                        record_wav=rec, use_registration=use_registration)
        with self._cond:
            call = self._calls_by_id.get(hid["h"])
            if call is None:
                call = CallHandle(self, hid["h"], "out")
                self._calls_by_id[call.id] = call
            call.record_wav = hid["record_wav"]
            self.calls.append(call)
        return call

    def on_incoming(self, answer: int | None = 200, *, tone_hz: float = 1000.0,
                    record_wav: str | os.PathLike[str] | None = None, ring_ms: int = 0,
                    early_media: bool = False) -> None:
        """Policy for incoming calls: send 180 at once, then after ``ring_ms`` answer with
        ``answer`` (200, or a rejection such as 486; ``None`` = keep ringing until
        :meth:`CallHandle.answer`). ``record_wav`` may contain ``{n}`` (the call number);
        by default each call records to its own file in the UA's dir. ``early_media``
        answers 183 with SDP instead of 180."""
        self._cmd("policy", answer=answer, tone_hz=tone_hz, record_wav=str(record_wav) if record_wav else None,
                  ring_ms=ring_ms, early_media=early_media)

    @property
    def received_requests(self) -> list[dict[str, Any]]:
        """Incoming INVITEs: dicts with ``ruri``, ``ruri_user``, ``to``, ``to_user``, ``from``,
        ``from_user``, ``headers`` (lower-case name -> values), ``src``, ``raw``."""
        return [c.info for c in self.incoming_calls]

    def wait_incoming(self, count: int = 1, timeout: float = 10.0) -> CallHandle:
        """Wait until ``count`` incoming calls arrived; returns the ``count``-th."""
        self._wait_for(lambda: len(self.incoming_calls) >= count, timeout, f"{count} incoming call(s)")
        return self.incoming_calls[count - 1]

    def hangup_all(self, timeout: float = 10.0) -> None:
        self._cmd("hangup_all")
        self._wait_for(lambda: all(not c.active for c in list(self._calls_by_id.values())), timeout, "all calls ended")

    # ---- lifecycle ------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """End the child: polite ``quit`` (unregister, hang up), then kill. Idempotent."""
        proc = getattr(self, "proc", None)
        if proc is None:
            return
        if proc.poll() is None:
            try:
                with self._write_lock:
                    assert proc.stdin is not None
                    proc.stdin.write(b'{"id": 0, "cmd": "quit", "args": {}}\n')
                    proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for f in (proc.stdin, proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._stderr.close()
        self._reader.join(2)

    def __enter__(self) -> PjUA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; tests should close() through a fixture
        try:
            proc = self.__dict__.get("proc")
            if proc is not None and proc.poll() is None:
                proc.kill()
        except Exception:
            pass


class UAPool:
    """Owns every :class:`PjUA` a test starts; :meth:`close_all` kills them all (use it
    in a fixture finalizer, see :func:`pjua`)."""

    def __init__(self, log_dir: str | os.PathLike[str] | None = None) -> None:
        self.log_dir = log_dir
        self.uas: list[PjUA] = []

    def new(self, name: str = "ua", **kw: Any) -> PjUA:
        if self.log_dir is not None:
            kw.setdefault("log_dir", self.log_dir)
        ua = PjUA(name, **kw)
        self.uas.append(ua)
        return ua

    __call__ = new

    def close_all(self) -> None:
        for ua in reversed(self.uas):
            try:
                ua.close()
            except Exception:
                pass
        self.uas.clear()


try:  # a ready-made fixture, ``pjua``: ``from e2e.pjua import pjua_fixture`` in a test module or conftest
    import pytest

    @pytest.fixture(name="pjua")  # named apart from the function: a test's pjua parameter shadows no import
    def pjua_fixture(tmp_path: Path) -> Any:
        """A :class:`UAPool` whose UAs log under ``tmp_path`` and are all killed afterwards."""
        pool = UAPool(tmp_path)
        try:
            yield pool
        finally:
            pool.close_all()
except ImportError:  # the child process does not need pytest
    pass


def provision_profile(api: Any, *, name: str = "HQ", channels: int = 2, auth: str = "digest",
                      credit: str | None = None, account_credit: str | None = None,
                      account: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Create (an account and) a SIP profile through the control API (``api``: an httpx
    client with the admin token, e.g. ``EdgeProcess.client()``). Returns the profile as
    the API answered it (``sip_username``, ``sip_password``, ``id`` ...) with the account
    under ``"account"``. ``credit`` is allocated from the account (topped up to cover it)."""
    import uuid

    if account is None:
        r = api.post("/v1/accounts", json={"name": f"Acct {name}", "admin": f"admin.{uuid.uuid4().hex[:10]}"})
        assert r.status_code == 201, r.text
        account = r.json()
    top_up = account_credit or credit
    if top_up:
        r = api.post(f"/v1/accounts/{account['id']}/credit", json={"amount": top_up})
        assert r.status_code in (200, 201), r.text
    body = {"name": name, "channels": channels, "auth": auth, **extra}
    r = api.post(f"/v1/accounts/{account['id']}/profiles", json=body)
    assert r.status_code == 201, r.text
    profile = r.json()
    if credit:
        r = api.post(f"/v1/profiles/{profile['id']}/credit", json={"amount": credit})
        assert r.status_code in (200, 201), r.text
        profile["balance"] = r.json()["balance"]
    profile["account"] = account
    return profile


def edge_registrar(edge: Any, transport: str = "udp") -> str:
    """The registrar URI of an ``EdgeProcess`` (``sip:127.0.0.1:PORT``, ``;transport=tcp``)."""
    return f"sip:127.0.0.1:{edge.sip_port}" + (";transport=tcp" if transport == "tcp" else "")


def _host(host: str) -> str:
    """A host as a URI names it: an IPv6 address in brackets (RFC 3261 §19.1.1)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _lr(uri: str) -> str:
    return uri if ";lr" in uri else uri + ";lr"


# --------------------------------------------------------------------------------------
# Child side: runs pjsua2
# --------------------------------------------------------------------------------------

def _child_main(cfg: dict[str, Any]) -> int:  # one closure keeps the child self-contained
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    log_fd = os.open(cfg["log_path"] + ".stdout", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)  # anything printed to fd 1 (pjsip, C code) must not corrupt the protocol
    sys.stdout = open(os.devnull, "w")

    import pjsua2 as pj

    out_lock = threading.Lock()
    t0 = time.monotonic()

    def emit(obj: dict[str, Any]) -> None:
        obj.setdefault("t", time.monotonic())
        with out_lock:
            proto.write(json.dumps(obj) + "\n")

    state_names = {getattr(pj, f"PJSIP_INV_STATE_{s}"): s for s in STATES}
    media_names = {pj.PJSUA_CALL_MEDIA_NONE: "NONE", pj.PJSUA_CALL_MEDIA_ACTIVE: "ACTIVE",
                   pj.PJSUA_CALL_MEDIA_LOCAL_HOLD: "LOCAL_HOLD", pj.PJSUA_CALL_MEDIA_REMOTE_HOLD: "REMOTE_HOLD",
                   pj.PJSUA_CALL_MEDIA_ERROR: "ERROR"}
    workdir = Path(cfg["dir"])
    tones: dict[float, str] = {}

    def tone_file(hz: float) -> str:
        if hz not in tones:
            p = workdir / f"tone-{int(hz)}.wav"
            write_tone_wav(p, hz)
            tones[hz] = str(p)
        return tones[hz]

    ep = pj.Endpoint()
    ep.libCreate()
    ep_cfg = pj.EpConfig()
    ep_cfg.uaConfig.threadCnt = 0
    ep_cfg.uaConfig.mainThreadOnly = True
    ep_cfg.uaConfig.maxCalls = int(cfg["max_calls"])
    ep_cfg.uaConfig.userAgent = cfg["user_agent"]
    ep_cfg.logConfig.level = int(cfg["log_level"])
    ep_cfg.logConfig.consoleLevel = 0
    ep_cfg.logConfig.filename = cfg["log_path"]
    ep_cfg.logConfig.msgLogging = 1
    ep_cfg.medConfig.noVad = True
    ep_cfg.medConfig.ecTailLen = 0
    ep_cfg.medConfig.clockRate = 16000
    ep_cfg.medConfig.sndClockRate = 16000
    ep.libInit(ep_cfg)

    tcfg = pj.TransportConfig()
    tcfg.port = int(cfg["port"])
    tcfg.boundAddress = cfg["bind"]
    tcfg.publicAddress = cfg["bind"]
    ipv6 = ":" in cfg["bind"]
    if ipv6:
        ttype = pj.PJSIP_TRANSPORT_TCP6 if cfg["transport"] == "tcp" else pj.PJSIP_TRANSPORT_UDP6
    else:
        ttype = pj.PJSIP_TRANSPORT_TCP if cfg["transport"] == "tcp" else pj.PJSIP_TRANSPORT_UDP
    tid = ep.transportCreate(ttype, tcfg)
    ep.libStart()
    if cfg["null_audio"]:
        ep.audDevManager().setNullDev()
    for codec in ep.codecEnum2():  # G.711 first: what carriers and the edge's relay expect
        prio = {"PCMU/8000/1": 255, "PCMA/8000/1": 254, "telephone-event/8000/1": 253}.get(codec.codecId)
        if prio is None and codec.codecId.startswith("telephone-event"):
            prio = 252
        ep.codecSetPriority(codec.codecId, prio if prio is not None else 0)
    local_name = ep.transportGetInfo(tid).localName
    port = int(local_name.rsplit(":", 1)[1])
    media_base = int(cfg["media_port"]) or (40000 + (os.getpid() % 1000) * 20)
    tsuffix = ";transport=tcp" if cfg["transport"] == "tcp" else ""

    policy: dict[str, Any] = {"answer": 200, "tone_hz": 1000.0, "record_wav": None, "ring_ms": 0,
                              "early_media": False}
    calls: dict[int, Any] = {}          # handle id -> Call
    timers: list[tuple[float, Any]] = []  # (due, fn) run by the main loop
    graveyard: list[Any] = []
    counter = {"h": 0, "in": 0}

    def next_h() -> int:
        counter["h"] += 1
        return counter["h"]

    def base_acfg(id_uri: str) -> Any:
        acfg = pj.AccountConfig()
        acfg.idUri = id_uri
        acfg.sipConfig.transportId = tid
        acfg.natConfig.contactRewriteUse = 0
        acfg.natConfig.viaRewriteUse = 0
        acfg.natConfig.sdpNatRewriteUse = 0
        acfg.natConfig.sipOutboundUse = 0
        acfg.natConfig.iceEnabled = False
        acfg.mediaConfig.transportConfig.port = media_base
        acfg.mediaConfig.transportConfig.portRange = 400
        acfg.mediaConfig.transportConfig.boundAddress = cfg["bind"]
        acfg.mediaConfig.transportConfig.publicAddress = cfg["bind"]
        acfg.regConfig.registerOnAdd = False
        acfg.regConfig.retryIntervalSec = 0
        acfg.regConfig.dropCallsOnFail = False
        acfg.callConfig.timerUse = pj.PJSUA_SIP_TIMER_INACTIVE
        if cfg["transport"] == "tcp" and "@" in id_uri:
            # pjsua would advertise the ephemeral port of its outgoing connection; a PBX
            # advertises its listener, which the edge can connect back to
            user = id_uri.split(":", 1)[1].split("@", 1)[0]
            acfg.sipConfig.contactForced = f"<sip:{user}@{_host(cfg['bind'])}:{port};transport=tcp>"
        return acfg

    def add_creds(acfg: Any, user: str, password: str) -> None:
        acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", user, 0, password))

    class UaCall(pj.Call):
        def __init__(self, acc: Any, call_id: int = pj.PJSUA_INVALID_ID, *, h: int, tone_hz: float,
                     record_wav: str) -> None:
            super().__init__(acc, call_id)
            self.h = h
            self.tone_hz = tone_hz
            self.record_wav = record_wav
            self.player: Any = None
            self.recorder: Any = None
            self.gone = False
            self.seen: set[Any] = set()

        def _media_objects(self) -> None:
            if self.player is None and self.tone_hz:
                self.player = pj.AudioMediaPlayer()
                self.player.createPlayer(tone_file(self.tone_hz), 0)  # 0 = loop
            if self.recorder is None and self.record_wav:
                self.recorder = pj.AudioMediaRecorder()
                self.recorder.createRecorder(self.record_wav)

        def release_media(self) -> None:
            self.player = None
            self.recorder = None  # pjsua_recorder_destroy finalises the WAV header

        def onCallState(self, prm: Any) -> None:
            self._rx_from_event(prm.e)
            ci = self.getInfo()
            state = state_names.get(ci.state, str(ci.state))
            if state == "DISCONNECTED":
                self.release_media()
                graveyard.append(self)
            emit({"event": "call_state", "h": self.h, "state": state, "status": ci.lastStatusCode,
                  "reason": ci.lastReason})

        def onCallMediaState(self, prm: Any) -> None:
            ci = self.getInfo()
            status = "NONE"
            for mi in ci.media:
                if mi.type != pj.PJMEDIA_TYPE_AUDIO:
                    continue
                status = media_names.get(mi.status, str(mi.status))
                if mi.status in (pj.PJSUA_CALL_MEDIA_ACTIVE, pj.PJSUA_CALL_MEDIA_REMOTE_HOLD):
                    try:
                        aud = self.getAudioMedia(mi.index)
                        self._media_objects()
                        if self.player is not None:
                            self.player.startTransmit(aud)
                        if self.recorder is not None:
                            aud.startTransmit(self.recorder)
                    except pj.Error as exc:
                        emit({"event": "log", "msg": f"media connect failed: {exc.info()}"})
                break
            emit({"event": "media", "h": self.h, "status": status})

        def _rx_from_event(self, e: Any) -> None:
            """Report the message a SipEvent carries, if it is a received one (deduplicated:
            the final response of an INVITE shows up in both onCallState and onCallTsxState)."""
            try:
                if e.type != pj.PJSIP_EVENT_TSX_STATE or e.body.tsxState.type != pj.PJSIP_EVENT_RX_MSG:
                    return
                raw = e.body.tsxState.src.rdata.wholeMsg
            except (AttributeError, pj.Error):
                return
            start, hdrs = parse_sip_headers(raw)
            key = (start, tuple(hdrs.get("cseq", [])), tuple(hdrs.get("via", [])[:1]))
            if key in self.seen:
                return
            self.seen.add(key)
            ev: dict[str, Any] = {"event": "rx", "h": self.h, "start": start, "headers": hdrs}
            cseq = hdrs.get("cseq", [""])[0].split()
            ev["cseq_method"] = cseq[1] if len(cseq) > 1 else ""
            if start.startswith("SIP/2.0"):
                parts = start.split(" ", 2)
                ev["code"] = int(parts[1])
                ev["reason"] = parts[2] if len(parts) > 2 else ""
            else:
                ev["method"] = start.split(" ", 1)[0]
            emit(ev)

        def onCallTsxState(self, prm: Any) -> None:
            self._rx_from_event(prm.e)

        def onDtmfDigit(self, prm: Any) -> None:
            emit({"event": "dtmf", "h": self.h, "digit": prm.digit})

    class UaAccount(pj.Account):
        def __init__(self, label: str) -> None:
            super().__init__()
            self.label = label

        def onRegState(self, prm: Any) -> None:
            emit({"event": "reg_state", "account": self.label, "code": prm.code, "reason": prm.reason,
                  "expires": prm.expiration})

        def onIncomingCall(self, prm: Any) -> None:
            h = next_h()
            counter["in"] += 1
            raw = prm.rdata.wholeMsg
            start, hdrs = parse_sip_headers(raw)
            ruri = start.split(" ")[1] if " " in start else ""
            rec = policy["record_wav"]
            rec = rec.replace("{n}", str(counter["in"])) if rec else str(workdir / f"in-{counter['in']}.wav")
            call = UaCall(self, prm.callId, h=h, tone_hz=policy["tone_hz"], record_wav=rec)
            calls[h] = call
            to = hdrs.get("to", [""])[0]
            frm = hdrs.get("from", [""])[0]
            emit({"event": "incoming", "h": h, "ruri": ruri, "ruri_user": _uri_user(ruri), "to": to,
                  "to_user": _uri_user(to), "from": frm, "from_user": _uri_user(frm), "headers": hdrs,
                  "src": prm.rdata.srcAddress, "record_wav": rec, "raw": raw})
            op = pj.CallOpParam()
            op.statusCode = 183 if policy["early_media"] else 180
            call.answer(op)
            answer = policy["answer"]
            if answer is not None:
                due = time.monotonic() + policy["ring_ms"] / 1000.0
                timers.append((due, lambda c=call, code=answer: answer_call(c, code)))

    def answer_call(call: Any, code: int) -> None:
        if call.gone or not call.isActive():
            return
        op = pj.CallOpParam()
        op.statusCode = code
        if code < 300:
            call.answer(op)
        else:
            call.hangup(op)

    # local account: peer-to-peer calls and the default for incoming INVITEs
    local = UaAccount("local")
    local.create(base_acfg(f"sip:{cfg['name']}@{_host(cfg['bind'])}:{port}{tsuffix}"), True)
    accounts: dict[Any, Any] = {}
    reg: dict[str, Any] = {}

    def cmd_register(a: dict[str, Any]) -> Any:
        acfg = base_acfg(f"sip:{a['username']}@{a['domain']}")
        if a.get("display_name"):
            acfg.idUri = f"\"{a['display_name']}\" <{acfg.idUri}>"
        acfg.regConfig.registrarUri = a["registrar"]
        acfg.regConfig.timeoutSec = int(a["expires"])
        acfg.regConfig.registerOnAdd = True
        acfg.sipConfig.proxies.append(a["proxy"])
        add_creds(acfg, a["username"], a["password"])
        old = reg.get("acc")
        if old is not None:
            graveyard.append(old)
        acc = UaAccount("reg")
        acc.create(acfg, False)
        reg["acc"] = acc
        reg["domain"] = a["domain"]
        return {"ok": True}

    def cmd_unregister(a: dict[str, Any]) -> Any:
        acc = reg.get("acc")
        if acc is None:
            raise RuntimeError("not registered")
        acc.setRegistration(False)
        return {}

    def account_for(a: dict[str, Any]) -> Any:
        if a.get("from_user") or a.get("auth") or a.get("proxy"):
            domain = a.get("domain") or (reg["domain"] if "domain" in reg else cfg["bind"])
            user = a.get("from_user") or (a["auth"][0] if a.get("auth") else cfg["name"])
            key = (user, domain, tuple(a.get("auth") or ()), a.get("proxy"))
            if key not in accounts:
                acfg = base_acfg(f"sip:{user}@{domain}")
                if a.get("proxy"):
                    acfg.sipConfig.proxies.append(a["proxy"])
                if a.get("auth"):
                    add_creds(acfg, a["auth"][0], a["auth"][1])
                acc = UaAccount(f"call-{len(accounts)}")
                acc.create(acfg, False)
                accounts[key] = acc
            return accounts[key]
        if a.get("use_registration", True) and reg.get("acc") is not None:
            return reg["acc"]
        return local

    def cmd_call(a: dict[str, Any]) -> Any:
        h = next_h()
        rec = a.get("record_wav") or str(workdir / f"out-{h}.wav")
        call = UaCall(account_for(a), h=h, tone_hz=float(a.get("tone_hz") or 0), record_wav=rec)
        op = pj.CallOpParam(True)
        for name, value in (a.get("headers") or {}).items():
            hdr = pj.SipHeader()
            hdr.hName = name
            hdr.hValue = value
            op.txOption.headers.append(hdr)
        calls[h] = call
        call.makeCall(a["uri"], op)
        return {"h": h, "record_wav": rec}

    def get_call(a: dict[str, Any]) -> Any:
        call = calls.get(a["h"])
        if call is None or call.gone:
            raise RuntimeError(f"no call {a['h']}")
        return call

    def cmd_hold(a: dict[str, Any]) -> Any:
        get_call(a).setHold(pj.CallOpParam(True))

    def cmd_unhold(a: dict[str, Any]) -> Any:
        op = pj.CallOpParam(True)
        op.opt.flag = pj.PJSUA_CALL_UNHOLD
        get_call(a).reinvite(op)

    def cmd_answer(a: dict[str, Any]) -> Any:
        answer_call(get_call(a), int(a["code"]))

    def cmd_hangup(a: dict[str, Any]) -> Any:
        call = get_call(a)
        op = pj.CallOpParam()
        if a.get("code"):
            op.statusCode = int(a["code"])
        call.hangup(op)

    def cmd_hangup_all(a: dict[str, Any]) -> Any:
        ep.hangupAllCalls()

    def cmd_dtmf(a: dict[str, Any]) -> Any:
        get_call(a).dialDtmf(a["digits"])

    def cmd_stats(a: dict[str, Any]) -> Any:
        call = get_call(a)
        ci = call.getInfo()
        for mi in ci.media:
            if mi.type == pj.PJMEDIA_TYPE_AUDIO:
                st = call.getStreamStat(mi.index).rtcp
                return {"rx_pkt": st.rxStat.pkt, "tx_pkt": st.txStat.pkt, "rx_loss": st.rxStat.loss,
                        "rx_jitter_usec": st.rxStat.jitterUsec.mean}
        return {}

    def cmd_policy(a: dict[str, Any]) -> Any:
        policy.update(a)

    handlers = {"hello": lambda a: {"port": port, "pid": os.getpid()}, "register": cmd_register,
                "unregister": cmd_unregister, "call": cmd_call, "hold": cmd_hold, "unhold": cmd_unhold,
                "answer": cmd_answer, "hangup": cmd_hangup, "hangup_all": cmd_hangup_all, "dtmf": cmd_dtmf,
                "stats": cmd_stats, "policy": cmd_policy}

    inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def stdin_reader() -> None:
        for line in sys.stdin:
            try:
                inbox.put(json.loads(line))
            except ValueError:
                continue
        inbox.put(None)  # EOF: the parent is gone

    threading.Thread(target=stdin_reader, daemon=True).start()
    parent = os.getppid()
    running = True
    while running:
        ep.libHandleEvents(10)
        now = time.monotonic()
        if timers:
            due = [t for t in timers if t[0] <= now]
            for t in due:
                timers.remove(t)
                try:
                    t[1]()
                except pj.Error as exc:
                    emit({"event": "log", "msg": f"timer failed: {exc.info()}"})
        if graveyard:
            for obj in graveyard:
                if isinstance(obj, UaCall):
                    obj.gone = True
                    calls.pop(obj.h, None)
            graveyard.clear()
        if now - t0 > float(cfg["max_lifetime"]) or os.getppid() != parent:
            break
        while True:
            try:
                msg = inbox.get_nowait()
            except queue.Empty:
                break
            if msg is None or msg.get("cmd") == "quit":
                running = False
                break
            try:
                result = handlers[msg["cmd"]](msg.get("args") or {})
                emit({"id": msg["id"], "ok": True, "result": result})
            except pj.Error as exc:
                emit({"id": msg["id"], "ok": False, "error": exc.info()})
            except Exception as exc:  # reported to the parent, never fatal to the child
                emit({"id": msg["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    # Orderly shutdown, bounded: hang up, unregister, give the stack a moment, destroy.
    try:
        ep.hangupAllCalls()
        acc = reg.get("acc")
        if acc is not None:
            try:
                info = acc.getInfo()
                if info.regIsActive:
                    acc.setRegistration(False)
            except pj.Error:
                pass
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            ep.libHandleEvents(20)
        for call in list(calls.values()):
            call.release_media()
        calls.clear()
    except pj.Error:
        pass
    os._exit(0)  # libDestroy can hang with Python-owned objects alive; the OS frees the rest


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        sys.exit(_child_main(json.loads(sys.argv[2])))
    print(__doc__)
