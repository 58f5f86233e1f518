"""RFC 3261 §12 dialogs: what one leg of a call remembers between its requests, and
the table that hands every in-dialog message to the INVITE session that owns it.

A :class:`Dialog` is plain state (Call-ID, tags, URIs, remote target, route set, both
CSeq counters, where the peer really is) plus the requests it implies: in-dialog
requests (§12.2.1.1) and the ACK of a 2xx (§13.2.2.4). It sends nothing itself.

:class:`Dialogs` keys each dialog by (Call-ID, local tag): the To tag of a request the
peer sends us, the From tag of a response to one we sent. A dialog that ended stays
in the table for :data:`LINGER` seconds so that a late BYE or a retransmitted 2xx still
finds its session (which then answers it as an ended dialog), and is swept out by one
periodic FIFO pass instead of one timer per dialog.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple, Protocol

from . import SipMessage
from .request import OutRequest
from .transport import Peer

if TYPE_CHECKING:
    from .transaction import Clock, ServerTransaction

LINGER = 32.0  # seconds an ended dialog is kept: 64*T1, the longest a retransmission can trail


class Local(NamedTuple):
    """How the edge names itself towards one peer: the Via sent-by and the Contact."""

    via_host: str                   # "host:port"
    contact: str                    # "<sip:host:port;transport=udp>"


def strip_tag(value: str) -> str:
    """A From/To header value without its ``tag`` parameter (the dialog adds its own)."""
    head, sep, rest = value.partition(";tag=")
    if not sep:
        return value
    _, semi, after = rest.partition(";")
    return head + (";" + after if semi else "")


class Dialog:
    """One leg's dialog state (RFC 3261 §12).

    :param peer: where requests of this dialog are sent: the address the peer's
        messages came from (NAT, RFC 3581), not necessarily its Contact.
    :param remote_target: Request-URI of in-dialog requests (the peer's Contact).
    :param route_set: Route headers of in-dialog requests, in the order they are sent.
    """

    __slots__ = ("call_id", "local_tag", "remote_tag", "local_uri", "remote_uri", "remote_target",
                 "route_set", "local_cseq", "remote_cseq", "peer", "local")

    def __init__(self, *, call_id: str, local_tag: str, local_uri: str, remote_uri: str, remote_target: str,
                 peer: Peer, local: Local, remote_tag: str | None = None, route_set: Iterable[str] = (),
                 local_cseq: int = 0, remote_cseq: int | None = None) -> None:
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag = remote_tag    # None until the peer's first tagged answer (UAC side)
        self.local_uri = local_uri      # name-addr without tag
        self.remote_uri = remote_uri
        self.remote_target = remote_target
        self.route_set = list(route_set)
        self.local_cseq = local_cseq    # CSeq of the last request we sent
        self.remote_cseq = remote_cseq  # CSeq of the last request the peer sent (None: none yet)
        self.peer = peer
        self.local = local

    @classmethod
    def for_uas(cls, request: SipMessage, peer: Peer, local: Local, local_tag: str) -> Dialog:
        """The dialog a received INVITE creates (§12.1.1): its Contact is the remote target,
        its Record-Route (in order) the route set, its From the remote party."""
        contact = request.contacts[0].uri if request.contacts and request.contacts[0].uri is not None else None
        target = str(contact) if contact is not None else str(request.from_.uri)
        return cls(call_id=request.call_id, local_tag=local_tag, remote_tag=request.from_tag,
                   local_uri=strip_tag(request.header("To") or ""),
                   remote_uri=strip_tag(request.header("From") or ""), remote_target=target, peer=peer,
                   local=local, route_set=request.headers("Record-Route"), remote_cseq=request.cseq)

    @property
    def key(self) -> tuple[str, str]:
        return (self.call_id, self.local_tag)

    @property
    def established(self) -> bool:
        """Does the peer's side have a tag yet (an early or confirmed dialog)?"""
        return self.remote_tag is not None

    def establish(self, response: SipMessage) -> None:
        """A 2xx to our INVITE confirms the dialog (§12.1.2): the peer's tag, its Contact as
        the remote target, and the Record-Route reversed as the route set."""
        self.remote_tag = response.to_tag
        self.refresh_target(response)
        self.route_set = list(reversed(response.headers("Record-Route")))

    def refresh_target(self, msg: SipMessage) -> None:
        """A target refresh (re-INVITE, UPDATE or their 2xx) moves the remote target (§12.2)."""
        contacts = msg.contacts
        if contacts and contacts[0].uri is not None:
            self.remote_target = str(contacts[0].uri)

    def accept_remote_cseq(self, cseq: int) -> bool:
        """§12.2.2: a request whose CSeq is lower than the last one is out of order (500)."""
        if self.remote_cseq is not None and cseq < self.remote_cseq:
            return False
        self.remote_cseq = cseq
        return True

    def _from(self) -> str:
        return f"{self.local_uri};tag={self.local_tag}"

    def _to(self, remote_tag: str | None = None) -> str:
        tag = remote_tag or self.remote_tag
        return f"{self.remote_uri};tag={tag}" if tag else self.remote_uri

    def request(self, method: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> OutRequest:
        """The next request in this dialog: to the remote target, through the route set (§12.2.1.1)."""
        self.local_cseq += 1
        hdrs = [("Route", r) for r in self.route_set]
        hdrs.append(("Contact", self.local.contact))
        hdrs.extend(headers)
        return OutRequest(method, self.remote_target, proto=self.peer.proto, via_host=self.local.via_host,
                          from_=self._from(), to=self._to(), call_id=self.call_id, cseq=self.local_cseq,
                          headers=hdrs, body=body)

    def ack(self, response: SipMessage) -> OutRequest:
        """The ACK of a 2xx (§13.2.2.4): a request of its own, with the INVITE's CSeq number
        and the To tag of that 2xx (another fork's 2xx is ACKed under its own tag)."""
        return OutRequest("ACK", self.remote_target, proto=self.peer.proto, via_host=self.local.via_host,
                          from_=self._from(), to=self._to(response.to_tag), call_id=self.call_id,
                          cseq=response.cseq, headers=[("Route", r) for r in self.route_set])

    def bye_for_fork(self, response: SipMessage) -> OutRequest:
        """A BYE for the dialog another fork's 2xx set up, which the call does not want."""
        contacts = response.contacts
        target = str(contacts[0].uri) if contacts and contacts[0].uri is not None else self.remote_target
        return OutRequest("BYE", target, proto=self.peer.proto, via_host=self.local.via_host,
                          from_=self._from(), to=self._to(response.to_tag), call_id=self.call_id,
                          cseq=self.local_cseq + 1)

    def as_record(self) -> dict[str, str]:
        """What is needed to BYE this leg after a restart (kept with the live call in LMDB)."""
        return {"peer": str(self.peer), "side": self.peer.side, "call_id": self.call_id, "local": self._from(),
                "remote": self._to(), "target": self.remote_target, "cseq": str(self.local_cseq)}


def bye_from_record(record: dict[str, str], local: Local, reason: str) -> tuple[OutRequest, Peer] | None:
    """Rebuild a BYE for a leg of a call a previous run left (see :meth:`Dialog.as_record`).

    :returns: the request and where to send it, or None if the record is unusable.
    """
    try:
        peer = peer_of(record["peer"])
        if peer is None:
            return None
        peer = peer._replace(side=record.get("side", ""))
        bye = OutRequest("BYE", record["target"], proto=peer.proto, via_host=local.via_host,
                         from_=record["local"], to=record["remote"], call_id=record["call_id"],
                         cseq=int(record.get("cseq", "1")) + 100, headers=[("Reason", reason)])
    except (KeyError, ValueError):
        return None
    return bye, peer


def peer_of(text: str) -> Peer | None:
    """``"udp:1.2.3.4:5060"`` (as ``str(Peer)`` writes it) back to a Peer."""
    proto, _, rest = text.partition(":")
    host, _, port = rest.rpartition(":")
    if proto not in ("udp", "tcp") or not host or not port.isdigit():
        return None
    return Peer(proto, host.strip("[]"), int(port))


class DialogUser(Protocol):
    """What owns a dialog: an INVITE session (edge/sip/invite.py)."""

    def on_in_dialog(self, tx: ServerTransaction) -> None: ...
    def on_ack(self, msg: SipMessage) -> None: ...
    def on_stray_2xx(self, msg: SipMessage) -> None: ...
    def on_cancel(self, cancel: SipMessage) -> None: ...


class Dialogs:
    """Every dialog of the node by (Call-ID, local tag), and the INVITE sessions still
    waiting for a final answer by their server transaction (CANCEL finds them there).

    :param clock: the event loop (``time``/``call_later``); tests pass a fake one.
    """

    def __init__(self, clock: Clock, linger: float = LINGER) -> None:
        self.clock = clock
        self.linger = linger
        self._by_key: dict[tuple[str, str], DialogUser] = {}
        self._by_invite: dict[tuple[object, ...], DialogUser] = {}
        self._ended: deque[tuple[float, tuple[str, str], DialogUser]] = deque()
        self._sweeping = False

    def __len__(self) -> int:
        return len(self._by_key)

    def add(self, dialog: Dialog, user: DialogUser) -> None:
        self._by_key[dialog.key] = user

    def add_invite(self, invite_key: tuple[object, ...], user: DialogUser) -> None:
        self._by_invite[invite_key] = user

    def invite_done(self, invite_key: tuple[object, ...]) -> None:
        self._by_invite.pop(invite_key, None)

    def ended(self, dialog: Dialog, user: DialogUser) -> None:
        """``dialog`` is over; forget it after the linger time (if nothing replaced it)."""
        self._ended.append((self.clock.time() + self.linger, dialog.key, user))
        if not self._sweeping:
            self._sweeping = True
            self.clock.call_later(min(1.0, self.linger), self._sweep)

    def _sweep(self) -> None:
        now = self.clock.time()
        queue = self._ended
        while queue and queue[0][0] <= now:
            _, key, user = queue.popleft()
            if self._by_key.get(key) is user:
                del self._by_key[key]
        if queue:
            self.clock.call_later(max(0.05, min(1.0, queue[0][0] - now)), self._sweep)
        else:
            self._sweeping = False

    # ------------------------------------------------------------ dispatch

    def on_request(self, tx: ServerTransaction) -> bool:
        """An in-dialog request (To tag present): to its session. False if no dialog matches."""
        req = tx.request
        user = self._by_key.get((req.call_id, req.to_tag or ""))
        if user is None:
            return False
        user.on_in_dialog(tx)
        return True

    def on_ack(self, msg: SipMessage) -> bool:
        user = self._by_key.get((msg.call_id, msg.to_tag or ""))
        if user is None:
            return False
        user.on_ack(msg)
        return True

    def on_cancel(self, invite_key: tuple[object, ...], cancel: SipMessage) -> bool:
        user = self._by_invite.get(invite_key)
        if user is None:
            return False
        user.on_cancel(cancel)
        return True

    def on_stray_response(self, msg: SipMessage) -> bool:
        """A 2xx to an INVITE of ours whose transaction is gone: its session ACKs it again."""
        if not 200 <= msg.status < 300 or msg.cseq_method != "INVITE":
            return False
        user = self._by_key.get((msg.call_id, msg.from_tag or ""))
        if user is None:
            return False
        user.on_stray_2xx(msg)
        return True
