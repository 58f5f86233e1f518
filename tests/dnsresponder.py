"""A small DNS responder for tests: UDP on 127.0.0.x, answers from records the test sets.

Built on dnspython's message API (no zone files, no internet). A name with records of other
types answers NOERROR with an empty answer (NoAnswer), an unknown name NXDOMAIN; ``mode``
switches to SERVFAIL for everything, or to silence (the client's lookup times out).
Every question is logged in ``queries`` as ``(name, type)``.
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsResponder:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.host, self.port = self.sock.getsockname()
        self.mode = "answer"                    # "answer" | "servfail" | "silent"
        self.queries: list[tuple[str, str]] = []
        self._records: dict[tuple[str, str], tuple[int, tuple[str, ...]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="dns-responder")
        self._thread.start()

    @property
    def server(self) -> str:
        """The ``[dns] servers`` entry of this responder."""
        return f"{self.host}:{self.port}"

    def set(self, name: str, rdtype: str, ttl: int, *values: str) -> None:
        """Records of ``name`` (absolute, trailing dot optional) and ``rdtype``; none: remove them."""
        key = (dns.name.from_text(name).to_text(), rdtype.upper())
        with self._lock:
            if values:
                self._records[key] = (ttl, values)
            else:
                self._records.pop(key, None)

    def asked(self, name: str, rdtype: str) -> int:
        """How many times ``name``/``rdtype`` was asked so far."""
        key = (dns.name.from_text(name).to_text(), rdtype.upper())
        with self._lock:
            return self.queries.count(key)

    def _answer(self, query: dns.message.Message) -> dns.message.Message | None:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name, rdtype = question.name.to_text(), dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((name, rdtype))
            if self.mode == "silent":
                return None
            if self.mode == "servfail":
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            found = self._records.get((name, rdtype))
            known = any(n == name for n, _ in self._records)
        if found is not None:
            ttl, values = found
            response.answer.append(dns.rrset.from_text(name, ttl, "IN", rdtype, *values))
        elif not known:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            try:
                query = dns.message.from_wire(data)
            except Exception:               # not a DNS query: ignore it, as a server would
                continue
            response = self._answer(query)
            if response is not None:
                self.sock.sendto(response.to_wire(), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
