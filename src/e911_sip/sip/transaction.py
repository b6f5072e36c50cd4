"""SIP transactions (RFC 3261 §17, with the ACCEPTED state of RFC 6026) as sans-IO machines.

Each machine takes what happened (a message from the network, a response from the transaction
user, a transport error, the clock reaching a deadline) and returns the effects to carry out,
in order. It never sends, sleeps or reads a clock: ``now`` is always an argument, and
``get_timer()`` tells the owner when to call ``handle_timer()`` next.
"""

# Theory of operation
# -------------------
# Why transactions at all: over UDP a request or response can be lost, so whoever sent it
# must repeat it until the other side shows it arrived (RFC 3261 §17.1.1.2, §17.1.2.2,
# §17.2.1). The receiver must in turn recognise repeats and answer them from memory instead
# of handing them up again (§17.2.3 for requests, §17.1.3 for responses). Over TCP or TLS
# the transport already delivers reliably, so every retransmission timer is off and every
# "linger to absorb stragglers" timer (D, I, J, K) is zero (§17.1.1.2, §17.2.2, Table 4 of
# §A).
#
# Why ACCEPTED (RFC 6026 §7.1, §7.2, §8.4, §8.7): RFC 3261 ended an INVITE transaction the
# moment a 2xx passed, which made 2xx retransmissions from the far end (and the ACKs of
# RFC 2543 peers, which share the INVITE's transaction identity, RFC 6026 §6) look like
# unrelated messages. The INVITE machines therefore linger in ACCEPTED for 64*T1 (Timers L
# and M): the client side passes every further 2xx up so the proxy can forward it, the
# server side transmits each 2xx the proxy hands it, absorbs INVITE retransmissions and passes
# ACKs up so the proxy can forward them end to end. The transaction layer itself never
# retransmits a 2xx and never ACKs one; that is the UAS and UAC cores' job (§13.3.1.4,
# §13.2.2.4).
#
# Why a non-2xx final response is ACKed here (§17.1.1.3): that ACK belongs to the INVITE
# transaction, goes hop by hop, and must look exactly like the INVITE's routing (one Via equal
# to the INVITE's top Via, the same Route set), so the next hop's server transaction matches
# it and stops retransmitting its final response.
#
# Why Timer B stops at the first provisional response (§17.1.1.2): once something answered,
# an INVITE may legitimately ring for minutes; a proxy bounds that with its own Timer C
# (§16.6 step 11), not the transaction.
#
# Why transport errors differ by side (§17.1.4, §17.2.4, RFC 6026 Figure 7): on the client
# side a transport error while the request is outstanding means the request could not be
# delivered, which the TU treats as a 408. Once a final response arrived the TU already has
# its answer, so a failure to deliver the ACK is left to Timer D. On the server side an
# INVITE transaction informs the TU but stays in PROCEEDING or ACCEPTED (RFC 6026 Figure 7),
# because the TU may still succeed with a later response on another connection; in
# COMPLETED the final response cannot be delivered, so it ends.
#
# Why every rule lives in one table (``TRANSITIONS``): reading one dict answers "what can
# happen in this state". An event that comes from the network and is not in the table is a
# stray or late message and is absorbed: a remote peer must never be able to make this code
# raise. An event from the TU that is not in the table is a programming error and raises
# ``TransactionStateError``.
#
# Why deadlines rather than timer objects: a machine holds at most one retransmission
# deadline (A, E or G) and one deadline that ends a phase (B, D, F, H, I, J, K, L or M), two
# floats. The owner arms a single wall-clock timer for ``get_timer()``. A retransmission timer
# that fires late is re-armed from the moment it fired, so a stalled event loop does not
# cause a burst of catch-up retransmissions; a due phase-ending timer wins over a due
# retransmission, since retransmitting just before giving up helps nobody.

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, Final, TypeVar

from e911_sip.sip.errors import TransactionStateError
from e911_sip.sip.message import Message, Request, Response, make_header
from e911_sip.sip.uri import Via, param_of

__all__ = [
    "DEFAULT_TIMERS",
    "TRANSITIONS",
    "build_cancel",
    "by_state",
    "ClientInviteTransaction",
    "ClientNonInviteTransaction",
    "Effect",
    "Event",
    "Kind",
    "PassUp",
    "ServerInviteTransaction",
    "ServerKey",
    "ServerNonInviteTransaction",
    "State",
    "Terminated",
    "Timeout",
    "TimerSettings",
    "Transmit",
    "TransportFailure",
    "client_key",
    "server_key",
]

MAGIC_COOKIE: Final = "z9hG4bK"
"""Branch prefix of RFC 3261 elements (§8.1.1.7); without it the peer is an RFC 2543 one."""


class State(Enum):
    """Transaction states of RFC 3261 §17.1.1, §17.1.2, §17.2.1 and §17.2.2.

    ACCEPTED is the state RFC 6026 §7.1 and §7.2 add to both INVITE machines for the time
    after a 2xx response.
    """

    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    ACCEPTED = "Accepted"
    CONFIRMED = "Confirmed"
    TERMINATED = "Terminated"

    # Members are singletons compared by identity; hashing by identity keeps the table
    # lookups on the C fast path instead of Enum's Python-level hash of the name.
    __hash__ = object.__hash__


class Kind(Enum):
    """The four transaction machines of RFC 3261 §17."""

    CLIENT_INVITE = "client INVITE"
    CLIENT_NON_INVITE = "client non-INVITE"
    SERVER_INVITE = "server INVITE"
    SERVER_NON_INVITE = "server non-INVITE"


class Event(Enum):
    """What can happen to a transaction; the value is how an error message names it."""

    # From the transaction user.
    START = "start"
    SEND_1XX = "send 1xx"
    SEND_2XX = "send 2xx"
    SEND_300_699 = "send 300-699"
    # From the network.
    RECV_1XX = "receive 1xx"
    RECV_2XX = "receive 2xx"
    RECV_300_699 = "receive 300-699"
    RECV_REQUEST = "receive request retransmission"
    RECV_ACK = "receive ACK"
    # From the transport.
    TRANSPORT_ERROR = "transport error"
    # From the clock (RFC 3261 §A, RFC 6026 §8.11).
    TIMER_A = "Timer A"
    TIMER_B = "Timer B"
    TIMER_D = "Timer D"
    TIMER_E = "Timer E"
    TIMER_F = "Timer F"
    TIMER_G = "Timer G"
    TIMER_H = "Timer H"
    TIMER_I = "Timer I"
    TIMER_J = "Timer J"
    TIMER_K = "Timer K"
    TIMER_L = "Timer L"
    TIMER_M = "Timer M"

    __hash__ = object.__hash__


_CI = Kind.CLIENT_INVITE
_CN = Kind.CLIENT_NON_INVITE
_SI = Kind.SERVER_INVITE
_SN = Kind.SERVER_NON_INVITE

TRANSITIONS: Final[dict[tuple[Kind, State, Event], State]] = {
    # Client INVITE: RFC 3261 §17.1.1.2 (Figure 5) as amended by RFC 6026 §8.4.
    (_CI, State.CALLING, Event.START): State.CALLING,
    (_CI, State.CALLING, Event.TIMER_A): State.CALLING,
    (_CI, State.CALLING, Event.TIMER_B): State.TERMINATED,
    (_CI, State.CALLING, Event.TRANSPORT_ERROR): State.TERMINATED,
    (_CI, State.CALLING, Event.RECV_1XX): State.PROCEEDING,
    (_CI, State.CALLING, Event.RECV_2XX): State.ACCEPTED,
    (_CI, State.CALLING, Event.RECV_300_699): State.COMPLETED,
    (_CI, State.PROCEEDING, Event.RECV_1XX): State.PROCEEDING,
    (_CI, State.PROCEEDING, Event.RECV_2XX): State.ACCEPTED,
    (_CI, State.PROCEEDING, Event.RECV_300_699): State.COMPLETED,
    (_CI, State.PROCEEDING, Event.TRANSPORT_ERROR): State.TERMINATED,
    (_CI, State.COMPLETED, Event.RECV_300_699): State.COMPLETED,
    (_CI, State.COMPLETED, Event.TIMER_D): State.TERMINATED,
    (_CI, State.ACCEPTED, Event.RECV_2XX): State.ACCEPTED,
    (_CI, State.ACCEPTED, Event.TIMER_M): State.TERMINATED,
    # Client non-INVITE: RFC 3261 §17.1.2.2 (Figure 6).
    (_CN, State.TRYING, Event.START): State.TRYING,
    (_CN, State.TRYING, Event.TIMER_E): State.TRYING,
    (_CN, State.TRYING, Event.TIMER_F): State.TERMINATED,
    (_CN, State.TRYING, Event.TRANSPORT_ERROR): State.TERMINATED,
    (_CN, State.TRYING, Event.RECV_1XX): State.PROCEEDING,
    (_CN, State.TRYING, Event.RECV_2XX): State.COMPLETED,
    (_CN, State.TRYING, Event.RECV_300_699): State.COMPLETED,
    (_CN, State.PROCEEDING, Event.RECV_1XX): State.PROCEEDING,
    (_CN, State.PROCEEDING, Event.TIMER_E): State.PROCEEDING,
    (_CN, State.PROCEEDING, Event.TIMER_F): State.TERMINATED,
    (_CN, State.PROCEEDING, Event.TRANSPORT_ERROR): State.TERMINATED,
    (_CN, State.PROCEEDING, Event.RECV_2XX): State.COMPLETED,
    (_CN, State.PROCEEDING, Event.RECV_300_699): State.COMPLETED,
    (_CN, State.COMPLETED, Event.TIMER_K): State.TERMINATED,
    # Server INVITE: RFC 3261 §17.2.1 as amended by RFC 6026 §7.1 and §8.5-§8.9 (Figure 7).
    (_SI, State.PROCEEDING, Event.RECV_REQUEST): State.PROCEEDING,
    (_SI, State.PROCEEDING, Event.SEND_1XX): State.PROCEEDING,
    (_SI, State.PROCEEDING, Event.SEND_2XX): State.ACCEPTED,
    (_SI, State.PROCEEDING, Event.SEND_300_699): State.COMPLETED,
    (_SI, State.PROCEEDING, Event.TRANSPORT_ERROR): State.PROCEEDING,
    (_SI, State.COMPLETED, Event.RECV_REQUEST): State.COMPLETED,
    (_SI, State.COMPLETED, Event.RECV_ACK): State.CONFIRMED,
    (_SI, State.COMPLETED, Event.TIMER_G): State.COMPLETED,
    (_SI, State.COMPLETED, Event.TIMER_H): State.TERMINATED,
    (_SI, State.COMPLETED, Event.TRANSPORT_ERROR): State.TERMINATED,
    (_SI, State.ACCEPTED, Event.SEND_2XX): State.ACCEPTED,
    (_SI, State.ACCEPTED, Event.RECV_ACK): State.ACCEPTED,
    (_SI, State.ACCEPTED, Event.TIMER_L): State.TERMINATED,
    (_SI, State.ACCEPTED, Event.TRANSPORT_ERROR): State.ACCEPTED,
    (_SI, State.CONFIRMED, Event.TIMER_I): State.TERMINATED,
    # Server non-INVITE: RFC 3261 §17.2.2 (Figure 8).
    (_SN, State.TRYING, Event.SEND_1XX): State.PROCEEDING,
    (_SN, State.TRYING, Event.SEND_2XX): State.COMPLETED,
    (_SN, State.TRYING, Event.SEND_300_699): State.COMPLETED,
    (_SN, State.PROCEEDING, Event.RECV_REQUEST): State.PROCEEDING,
    (_SN, State.PROCEEDING, Event.SEND_1XX): State.PROCEEDING,
    (_SN, State.PROCEEDING, Event.SEND_2XX): State.COMPLETED,
    (_SN, State.PROCEEDING, Event.SEND_300_699): State.COMPLETED,
    (_SN, State.PROCEEDING, Event.TRANSPORT_ERROR): State.TERMINATED,
    (_SN, State.COMPLETED, Event.RECV_REQUEST): State.COMPLETED,
    (_SN, State.COMPLETED, Event.TRANSPORT_ERROR): State.TERMINATED,
    (_SN, State.COMPLETED, Event.TIMER_J): State.TERMINATED,
}
"""Every transition of every machine: (kind, state, event) -> next state.

A network or transport event missing here is absorbed (the call returns no effects); a
transaction-user event missing here raises ``TransactionStateError``. Absorbed events
include request retransmissions in TRYING, ACCEPTED and CONFIRMED, stray ACKs, responses in
COMPLETED of a non-INVITE client, and anything at all once TERMINATED.
"""


_FINISHED: Final = frozenset({State.COMPLETED, State.ACCEPTED, State.CONFIRMED})
"""States after the final response, where a machine only absorbs retransmissions."""


_S = TypeVar("_S", bound=Enum)
_E = TypeVar("_E", bound=Enum)


def by_state(states: Iterable[_S], table: Mapping[tuple[_S, _E], _S]) -> dict[_S, dict[_E, _S]]:
    """``table``, a machine's (state, event) -> next state, indexed by state and then event:
    two lookups keyed by an enum member (hashed by identity), where a (state, event) pair
    would be a tuple built and hashed per step. Every member of ``states`` has an entry (an
    empty one when no event leaves it), so a step reads it with ``[]`` and no test for a
    missing one. The transactions' machines and the proxy's branch and context machines
    are all read this way."""
    out: dict[_S, dict[_E, _S]] = {state: {} for state in states}
    for (state, event), nxt in table.items():
        out[state][event] = nxt
    return out


def _table_for(kind: Kind) -> dict[State, dict[Event, State]]:
    """The machine ``kind``'s part of ``TRANSITIONS``, by state and then event."""
    return by_state(State, {(s, e): nxt for (k, s, e), nxt in TRANSITIONS.items() if k is kind})


_CLIENT_INVITE_TABLE: Final = _table_for(Kind.CLIENT_INVITE)
_CLIENT_NON_INVITE_TABLE: Final = _table_for(Kind.CLIENT_NON_INVITE)
_SERVER_INVITE_TABLE: Final = _table_for(Kind.SERVER_INVITE)
_SERVER_NON_INVITE_TABLE: Final = _table_for(Kind.SERVER_NON_INVITE)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerSettings:
    """The base timer values of RFC 3261 §17.1.1.1 and §A, in seconds.

    Every other timer derives from these three (RFC 3261 Table 4, RFC 6026 §8.11). Timers
    D, I, J and K apply only on unreliable transports; on TCP/TLS they are zero.
    """

    t1: float = 0.5
    """Round-trip time estimate: the first retransmission interval and the 64*T1 unit."""
    t2: float = 4.0
    """Cap on the retransmission interval of non-INVITE requests and INVITE final responses."""
    t4: float = 5.0
    """Longest time a message may stay in the network: Timers I and K on unreliable links."""

    def __post_init__(self) -> None:
        if not self.t1 > 0:
            raise ValueError(f"T1 must be positive, got {self.t1}")
        if not self.t2 >= self.t1:
            raise ValueError(f"T2 ({self.t2}) must not be below T1 ({self.t1})")
        if not self.t4 >= 0:
            raise ValueError(f"T4 must not be negative, got {self.t4}")

    @property
    def timer_b(self) -> float:
        """Timer B, INVITE transaction timeout: 64*T1."""
        return 64 * self.t1

    @property
    def timer_d(self) -> float:
        """Timer D, wait for response retransmissions (unreliable): at least 32 s and 64*T1."""
        return max(32.0, 64 * self.t1)

    @property
    def timer_f(self) -> float:
        """Timer F, non-INVITE transaction timeout: 64*T1."""
        return 64 * self.t1

    @property
    def timer_h(self) -> float:
        """Timer H, wait for the ACK to a non-2xx final response: 64*T1."""
        return 64 * self.t1

    @property
    def timer_i(self) -> float:
        """Timer I, wait for ACK retransmissions (unreliable): T4."""
        return self.t4

    @property
    def timer_j(self) -> float:
        """Timer J, wait for non-INVITE request retransmissions (unreliable): 64*T1."""
        return 64 * self.t1

    @property
    def timer_k(self) -> float:
        """Timer K, wait for non-INVITE response retransmissions (unreliable): T4."""
        return self.t4

    @property
    def timer_l(self) -> float:
        """Timer L, wait for 2xx from the TU and ACKs after a 2xx (RFC 6026): 64*T1."""
        return 64 * self.t1

    @property
    def timer_m(self) -> float:
        """Timer M, wait for 2xx retransmissions after the first 2xx (RFC 6026): 64*T1."""
        return 64 * self.t1


DEFAULT_TIMERS: Final = TimerSettings()
"""RFC 3261's recommended values: T1 = 500 ms, T2 = 4 s, T4 = 5 s."""


# -- effects -------------------------------------------------------------------------------
# Not frozen: several are made per message and a frozen dataclass pays an
# object.__setattr__ per field on construction. Nobody mutates them. Each __init__ is written
# out (dataclass keeps one the class defines): compiled, it is native, where the generated
# one runs as Python.


@dataclass(slots=True)
class Transmit:
    """Put ``message`` on the wire to the transaction's peer.

    Covers the first send, every retransmission and the ACK an INVITE client transaction
    generates for a non-2xx final response.
    """

    message: Message

    def __init__(self, message: Message) -> None:
        self.message = message


@dataclass(slots=True)
class PassUp:
    """Hand ``message`` to the transaction user."""

    message: Message

    def __init__(self, message: Message) -> None:
        self.message = message


@dataclass(slots=True)
class Timeout:
    """A transaction timer ran out: ``"B"`` or ``"F"`` (the TU treats it as 408) or ``"H"``."""

    timer: str

    def __init__(self, timer: str) -> None:
        self.timer = timer


@dataclass(slots=True)
class TransportFailure:
    """The transport reported an error; the TU treats it as a 408 (RFC 3261 §8.1.3.1)."""


@dataclass(slots=True)
class Terminated:
    """The transaction is over; its owner drops it (RFC 3261 §17.1.1.2, §17.2.1)."""


Effect = Transmit | PassUp | Timeout | TransportFailure | Terminated
"""One thing the owner of a transaction must do, in the order returned."""

_TERMINATED: Final = Terminated()
_TRANSPORT_FAILURE: Final = TransportFailure()
_TIMEOUTS: Final = {
    Event.TIMER_B: Timeout("B"),
    Event.TIMER_F: Timeout("F"),
    Event.TIMER_H: Timeout("H"),
}


# -- transaction identity -------------------------------------------------------------------

ServerKey = tuple[str, str, str]
"""A server transaction's identity: (branch or RFC 2543 identity, sent-by, method)."""


# Via is a NamedTuple, not a native class: compiled, each of its properties is a generic
# attribute lookup and a call (and ``branch`` one more, to ``param``). The keys read them for
# every message; these two functions give the same values natively.
def via_branch(via: Via) -> str | None:
    """``via.branch``."""
    return param_of(via.params, "branch")


def via_sent_by(via: Via) -> str:
    """``via.sent_by``."""
    return f"{via.host}:{via.port or 5060}"


def server_key(request: Request, method: str | None = None) -> ServerKey:
    """The key that matches ``request`` to its server transaction (RFC 3261 §17.2.3).

    For an RFC 3261 branch (``z9hG4bK...``) the key is the top Via's branch, its sent-by as
    lower-case ``host:port`` (port 5060 when absent) and the method, with ACK counted as
    INVITE so that the ACK to a non-2xx response finds its INVITE transaction. ``method``
    replaces the request's method: a proxy passes ``"INVITE"`` to find the INVITE a CANCEL
    targets (§9.2).

    A branch without the cookie comes from an RFC 2543 peer, whose branches need not be
    unique. Its first element is then built from the old rule's fields: Request-URI, From
    tag, Call-ID, CSeq number and the whole top Via. The To tag the old rule also names is
    left out on purpose: the ACK to a final response carries the To tag of that response,
    which the INVITE did not have, and the key must be the same for both; Call-ID, From tag
    and CSeq number already tell an initial INVITE from a re-INVITE. That element starts with
    ``"rfc2543 "`` and so never equals a real branch.

    Raises:
        MalformedMessage: the request has no usable Via, Call-ID or CSeq (``parse`` already
            rejects such requests).
    """
    via = request.top_via
    if method is None:
        method = request.method
    if method == "ACK":
        method = "INVITE"
    branch = via_branch(via)
    if branch and branch.startswith(MAGIC_COOKIE):
        return branch, via_sent_by(via), method
    identity = (request.uri, request.from_tag or "", request.call_id, request.cseq[0], via.raw)
    return f"rfc2543 {identity!r}", via_sent_by(via), method


def client_key(response: Response) -> tuple[str, str]:
    """The key that matches ``response`` to its client transaction (RFC 3261 §17.1.3).

    It is the top Via's branch (empty when there is none, which matches nothing this element
    sent) and the CSeq method, so a 200 to a CANCEL does not match the INVITE it cancelled.
    """
    return via_branch(response.top_via) or "", response.cseq[1]


# -- machines -------------------------------------------------------------------------------


def _response_event(status: int) -> Event | None:
    if status < 100:
        return None
    if status < 200:
        return Event.RECV_1XX
    if status < 300:
        return Event.RECV_2XX
    if status < 700:
        return Event.RECV_300_699
    return None


def _send_event(status: int) -> Event:
    if 100 <= status < 200:
        return Event.SEND_1XX
    if 200 <= status < 300:
        return Event.SEND_2XX
    if 300 <= status < 700:
        return Event.SEND_300_699
    raise ValueError(f"a transaction cannot send status {status}")


class _Transaction:
    """State, timers and the table lookups the four machines share.

    Once the final response has passed (``finished``), a machine only absorbs
    retransmissions for up to 32 s; it lets go of its request then, keeping what that state
    still reads (the final response to resend, the ACK of a non-2xx), because over UDP the
    owner holds thousands of such machines and the garbage collector walks every object
    they keep.
    """

    __slots__ = (
        "request",
        "method",
        "state",
        "reliable",
        "timers",
        "_retx_at",
        "_retx_interval",
        "_end_at",
        "_end_timer",
        "_steps",
    )

    kind: ClassVar[Kind]
    _table: ClassVar[dict[State, dict[Event, State]]]
    _steps: dict[State, dict[Event, State]]
    """The class's ``_table``, held by the instance: compiled, reading a class attribute
    through ``self`` is a generic attribute lookup, and an instance slot a native read."""

    request: Request | None
    """The request the transaction was made for; None once ``finished``."""
    method: str
    state: State
    reliable: bool
    timers: TimerSettings

    def __init__(self, request: Request, state: State, reliable: bool, timers: TimerSettings):
        self.request = request
        self.method = request.method
        self.state = state
        self.reliable = reliable
        self.timers = timers
        self._retx_at: float | None = None
        self._retx_interval = 0.0
        self._end_at: float | None = None
        self._end_timer = Event.TIMER_B

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.method} {self.state.name}>"

    @property
    def finished(self) -> bool:
        """Past the final response: only absorbing retransmissions until a timer ends it
        (client COMPLETED or ACCEPTED, server COMPLETED, CONFIRMED or ACCEPTED)."""
        return self.state in _FINISHED

    def get_timer(self) -> float | None:
        """The earliest pending deadline, or None when no timer is running."""
        retx_at = self._retx_at
        end_at = self._end_at
        if retx_at is None:
            return end_at
        if end_at is None or retx_at < end_at:
            return retx_at
        return end_at

    def handle_timer(self, now: float) -> list[Effect]:
        """Fire every timer due at or before ``now``; nothing happens when none is due."""
        end_at = self._end_at
        if end_at is not None and end_at <= now:
            return self._expire(self._end_timer)
        retx_at = self._retx_at
        if retx_at is not None and retx_at <= now:
            return self._retransmit(now)
        return []

    def transport_error(self, now: float) -> list[Effect]:
        """The transport failed to deliver this transaction's message (RFC 3261 §17.1.4, §17.2.4).

        Returns ``[TransportFailure(), Terminated()]`` where the state ends on a transport
        error, ``[TransportFailure()]`` where it only informs the TU, ``[]`` where nothing
        this transaction sends is outstanding.
        """
        nxt = self._steps[self.state].get(Event.TRANSPORT_ERROR)
        if nxt is None:
            return []
        if nxt is State.TERMINATED:
            self._terminate()
            return [_TRANSPORT_FAILURE, _TERMINATED]
        self.state = nxt
        return [_TRANSPORT_FAILURE]

    # -- internals ------------------------------------------------------------------------
    def _tu_step(self, event: Event) -> State:
        nxt = self._steps[self.state].get(event)
        if nxt is None:
            raise TransactionStateError(self.kind.value, self.state.name, event.value)
        return nxt

    def _arm_end(self, event: Event, at: float) -> None:
        self._end_timer = event
        self._end_at = at

    def _terminate(self) -> None:
        self.state = State.TERMINATED
        self._retx_at = None
        self._end_at = None

    def _expire(self, event: Event) -> list[Effect]:
        """Fire a phase-ending timer (also used for the zero-length ones on reliable links).

        Every such timer ends the transaction (see ``TRANSITIONS``).
        """
        self._end_at = None
        if event not in self._steps[self.state]:
            return []
        self._terminate()
        timeout = _TIMEOUTS.get(event)
        return [_TERMINATED] if timeout is None else [timeout, _TERMINATED]

    def _retransmit(self, now: float) -> list[Effect]:
        raise NotImplementedError


class _ClientTransaction(_Transaction):
    __slots__ = ("key", "_started")

    key: tuple[str, str]

    def __init__(
        self,
        request: Request,
        state: State,
        reliable: bool,
        timers: TimerSettings,
        branch: str | None,
    ) -> None:
        super().__init__(request, state, reliable, timers)
        if branch is None:
            branch = via_branch(request.top_via)
        if not branch:
            raise ValueError(
                "a client transaction's request needs a Via branch (RFC 3261 §8.1.1.7)"
            )
        self.key = (branch, request.method)
        self._started = False

    def _start(self, now: float, end_timer: Event) -> list[Effect]:
        if self._started:
            raise TransactionStateError(self.kind.value, self.state.name, Event.START.value)
        self.state = self._tu_step(Event.START)
        self._started = True
        t1 = self.timers.t1
        if not self.reliable:
            self._retx_interval = t1
            self._retx_at = now + t1
        self._arm_end(end_timer, now + 64 * t1)
        return self._transmit_request()

    def _transmit_request(self) -> list[Effect]:
        # A Transmit made per send rather than kept: sends after the first are retransmissions
        # (rare), and a finished transaction keeps nothing of its request.
        request = self.request
        return [] if request is None else [Transmit(request)]


class ClientInviteTransaction(_ClientTransaction):
    """The INVITE client transaction (RFC 3261 §17.1.1, RFC 6026 §7.2 and §8.4).

    Created in CALLING; ``start()`` sends the INVITE. Timer A retransmits it on unreliable
    transports (T1, doubling without a cap) until a response arrives; Timer B (64*T1) gives
    up while still in CALLING. A provisional response moves to PROCEEDING and stops both: the
    TU bounds ringing itself. A 2xx moves to ACCEPTED, where further 2xx responses are passed
    up until Timer M (64*T1). A 300-699 response is ACKed here and moves to COMPLETED, where
    retransmissions of it are ACKed again until Timer D.
    """

    __slots__ = ("_ack",)

    kind = Kind.CLIENT_INVITE
    _table = _CLIENT_INVITE_TABLE

    def __init__(
        self,
        request: Request,
        *,
        reliable: bool,
        timers: TimerSettings = DEFAULT_TIMERS,
        branch: str | None = None,
    ) -> None:
        """``branch``, when given, is the request's top Via branch, known to the caller that
        wrote it (it saves parsing that Via again)."""
        if request.method != "INVITE":
            raise ValueError(f"an INVITE client transaction cannot carry {request.method}")
        self._steps = _CLIENT_INVITE_TABLE
        super().__init__(request, State.CALLING, reliable, timers, branch)
        self._ack: Transmit | None = None

    def start(self, now: float) -> list[Effect]:
        """Send the INVITE: ``[Transmit(request)]``; arms Timer A (unreliable only) and B.

        Raises:
            TransactionStateError: the transaction was started before.
        """
        return self._start(now, Event.TIMER_B)

    def receive(self, response: Response, now: float) -> list[Effect]:
        """A response matched to this transaction by ``client_key`` arrived."""
        event = _response_event(response.status)
        if event is None:
            return []
        state = self.state
        nxt = self._steps[state].get(event)
        if nxt is None:
            return []
        if event is Event.RECV_1XX:
            self.state = nxt
            self._retx_at = None
            self._end_at = None
            return [PassUp(response)]
        if event is Event.RECV_2XX:
            if state is not State.ACCEPTED:
                self.state = nxt
                self.request = None
                self._retx_at = None
                self._arm_end(Event.TIMER_M, now + self.timers.timer_m)
            return [PassUp(response)]
        if state is State.COMPLETED:
            ack = self._ack
            return [] if ack is None else [ack]
        ack = self._ack = Transmit(self.build_ack(response))
        self.state = nxt
        self.request = None
        self._retx_at = None
        if self.reliable:
            return [ack, PassUp(response), *self._expire(Event.TIMER_D)]
        self._arm_end(Event.TIMER_D, now + self.timers.timer_d)
        return [ack, PassUp(response)]

    def build_ack(self, response: Response) -> Request:
        """The ACK for a 300-699 ``response`` to this INVITE (RFC 3261 §17.1.1.3).

        It keeps the INVITE's Request-URI, Call-ID, From and CSeq number, takes To (with the
        tag) from the response, has exactly one Via equal to the INVITE's top Via, repeats the
        INVITE's Route headers, and has Max-Forwards 70 and no body.

        Raises:
            TransactionStateError: the transaction is finished and no longer holds the INVITE.
        """
        request = self.request
        if request is None:
            raise TransactionStateError(self.kind.value, self.state.name, "build ACK")
        return _same_transaction(request, "ACK", response.get("to") or "")

    def _retransmit(self, now: float) -> list[Effect]:
        if Event.TIMER_A not in self._steps[self.state]:
            self._retx_at = None
            return []
        interval = self._retx_interval * 2
        self._retx_interval = interval
        self._retx_at = now + interval
        return self._transmit_request()


class ClientNonInviteTransaction(_ClientTransaction):
    """The non-INVITE client transaction (RFC 3261 §17.1.2).

    Created in TRYING; ``start()`` sends the request. Timer E retransmits it on unreliable
    transports, doubling from T1 up to T2 in TRYING and every T2 once a provisional response
    arrived; Timer F (64*T1) gives up in TRYING or PROCEEDING. The final response is passed up
    and the transaction lingers in COMPLETED for Timer K to absorb its retransmissions.
    """

    __slots__ = ()

    kind = Kind.CLIENT_NON_INVITE
    _table = _CLIENT_NON_INVITE_TABLE

    def __init__(
        self,
        request: Request,
        *,
        reliable: bool,
        timers: TimerSettings = DEFAULT_TIMERS,
        branch: str | None = None,
    ) -> None:
        """``branch``, when given, is the request's top Via branch, known to the caller that
        wrote it (it saves parsing that Via again)."""
        if request.method in ("INVITE", "ACK"):
            raise ValueError(f"a non-INVITE client transaction cannot carry {request.method}")
        self._steps = _CLIENT_NON_INVITE_TABLE
        super().__init__(request, State.TRYING, reliable, timers, branch)

    def start(self, now: float) -> list[Effect]:
        """Send the request: ``[Transmit(request)]``; arms Timer E (unreliable only) and F.

        Raises:
            TransactionStateError: the transaction was started before.
        """
        return self._start(now, Event.TIMER_F)

    def receive(self, response: Response, now: float) -> list[Effect]:
        """A response matched to this transaction by ``client_key`` arrived."""
        event = _response_event(response.status)
        if event is None:
            return []
        nxt = self._steps[self.state].get(event)
        if nxt is None:
            return []
        self.state = nxt
        if event is Event.RECV_1XX:
            return [PassUp(response)]
        self.request = None
        self._retx_at = None
        if self.reliable:
            return [PassUp(response), *self._expire(Event.TIMER_K)]
        self._arm_end(Event.TIMER_K, now + self.timers.timer_k)
        return [PassUp(response)]

    def _retransmit(self, now: float) -> list[Effect]:
        state = self.state
        if Event.TIMER_E not in self._steps[state]:
            self._retx_at = None
            return []
        t2 = self.timers.t2
        interval = t2 if state is State.PROCEEDING else min(self._retx_interval * 2, t2)
        self._retx_interval = interval
        self._retx_at = now + interval
        return self._transmit_request()


def build_cancel(invite: Request) -> Request:
    """The CANCEL for a sent INVITE (RFC 3261 §9.1): the INVITE's Request-URI, Call-ID, From,
    To, CSeq number, Route headers and top Via (so it reaches the INVITE's server
    transaction), Max-Forwards 70 and no body."""
    return _same_transaction(invite, "CANCEL", invite.get("to") or "")


def _same_transaction(invite: Request, method: str, to: str) -> Request:
    # ACK for a non-2xx and CANCEL are built alike: they must match the INVITE's
    # transaction at the next hop and follow the INVITE's route.
    headers = [make_header("Via", invite.top_via.raw.strip())]
    headers.extend(make_header("Route", value) for value in invite.get_all("route"))
    headers.append(make_header("Max-Forwards", "70"))
    headers.append(make_header("From", invite.get("from") or ""))
    headers.append(make_header("To", to))
    headers.append(make_header("Call-ID", invite.call_id))
    headers.append(make_header("CSeq", f"{invite.cseq[0]} {method}"))
    headers.append(make_header("Content-Length", "0"))
    return Request(method, invite.uri, headers)


class _ServerTransaction(_Transaction):
    __slots__ = ("key", "last_response")

    key: ServerKey
    last_response: Response | None
    """The latest response sent: a retransmitted request is answered with it (None in
    ACCEPTED, where nothing is answered)."""

    def __init__(
        self,
        request: Request,
        state: State,
        reliable: bool,
        timers: TimerSettings,
        key: ServerKey | None,
    ) -> None:
        super().__init__(request, state, reliable, timers)
        self.key = server_key(request) if key is None else key
        self.last_response = None

    def _record(self, response: Response, nxt: State) -> Transmit:
        # In ACCEPTED a retransmitted INVITE is absorbed, never answered (RFC 6026 §7.1), so
        # the 2xx is not kept: with its SDP it was a third of what a finished call held for
        # the 32 s of Timer L, and 911 calls' transactions are never evicted.
        self.last_response = None if nxt is State.ACCEPTED else response
        self.state = nxt
        if nxt in _FINISHED:
            self.request = None
        return Transmit(response)

    def _resend_last(self) -> list[Effect]:
        # Made per resend, not kept: a retransmitted request is the exception.
        last = self.last_response
        return [] if last is None else [Transmit(last)]


class ServerInviteTransaction(_ServerTransaction):
    """The INVITE server transaction (RFC 3261 §17.2.1, RFC 6026 §7.1 and §8.5-§8.9).

    Created in PROCEEDING when the INVITE arrives (the TU sends 100 Trying itself).
    Retransmitted INVITEs are answered with the latest provisional response. A 2xx from the TU
    moves to ACCEPTED, where further 2xx responses from the TU are sent, INVITE
    retransmissions are absorbed and ACKs are passed up, until Timer L. A 300-699 response
    moves to COMPLETED: Timer G retransmits it on unreliable transports (T1 doubling up to T2)
    until the ACK arrives (CONFIRMED, then Timer I) or Timer H gives up.
    """

    __slots__ = ()

    kind = Kind.SERVER_INVITE
    _table = _SERVER_INVITE_TABLE

    def __init__(
        self,
        request: Request,
        *,
        reliable: bool,
        timers: TimerSettings = DEFAULT_TIMERS,
        key: ServerKey | None = None,
    ) -> None:
        """``key``, when given, is ``server_key(request)``, already computed by the caller."""
        if request.method != "INVITE":
            raise ValueError(f"an INVITE server transaction cannot carry {request.method}")
        self._steps = _SERVER_INVITE_TABLE
        super().__init__(request, State.PROCEEDING, reliable, timers, key)

    def receive(self, request: Request, now: float) -> list[Effect]:
        """A retransmitted INVITE or an ACK matched to this transaction by ``server_key``."""
        method = request.method
        if method == "ACK":
            event = Event.RECV_ACK
        elif method == "INVITE":
            event = Event.RECV_REQUEST
        else:
            return []
        state = self.state
        nxt = self._steps[state].get(event)
        if nxt is None:
            return []
        if event is Event.RECV_REQUEST:
            return self._resend_last()
        if state is State.ACCEPTED:
            return [PassUp(request)]
        self.state = nxt
        self._retx_at = None
        self._end_at = None
        if self.reliable:
            return self._expire(Event.TIMER_I)
        self._arm_end(Event.TIMER_I, now + self.timers.timer_i)
        return []

    def send_response(self, response: Response, now: float) -> list[Effect]:
        """Send a response from the TU: ``[Transmit(response)]``.

        Raises:
            TransactionStateError: the state does not allow this response (anything after a
                300-699, a provisional or 300-699 response after a 2xx, anything once
                terminated).
            ValueError: the status is outside 100-699.
        """
        event = _send_event(response.status)
        state = self.state
        nxt = self._tu_step(event)
        sent = self._record(response, nxt)
        if event is Event.SEND_2XX:
            if state is State.PROCEEDING:
                self._arm_end(Event.TIMER_L, now + self.timers.timer_l)
        elif event is Event.SEND_300_699:
            t1 = self.timers.t1
            if not self.reliable:
                self._retx_interval = t1
                self._retx_at = now + t1
            self._arm_end(Event.TIMER_H, now + self.timers.timer_h)
        return [sent]

    def _retransmit(self, now: float) -> list[Effect]:
        if Event.TIMER_G not in self._steps[self.state]:
            self._retx_at = None
            return []
        interval = min(self._retx_interval * 2, self.timers.t2)
        self._retx_interval = interval
        self._retx_at = now + interval
        return self._resend_last()


class ServerNonInviteTransaction(_ServerTransaction):
    """The non-INVITE server transaction (RFC 3261 §17.2.2).

    Created in TRYING when the request arrives; retransmissions are absorbed until the TU
    answers. After a provisional response (PROCEEDING) or the final one (COMPLETED) each
    retransmission is answered with the latest response. The transaction lingers in COMPLETED
    for Timer J (64*T1, zero on reliable transports).
    """

    __slots__ = ()

    kind = Kind.SERVER_NON_INVITE
    _table = _SERVER_NON_INVITE_TABLE

    def __init__(
        self,
        request: Request,
        *,
        reliable: bool,
        timers: TimerSettings = DEFAULT_TIMERS,
        key: ServerKey | None = None,
    ) -> None:
        """``key``, when given, is ``server_key(request)``, already computed by the caller."""
        if request.method in ("INVITE", "ACK"):
            raise ValueError(f"a non-INVITE server transaction cannot carry {request.method}")
        self._steps = _SERVER_NON_INVITE_TABLE
        super().__init__(request, State.TRYING, reliable, timers, key)

    def receive(self, request: Request, now: float) -> list[Effect]:
        """A retransmission of the request matched to this transaction by ``server_key``."""
        if request.method != self.method:
            return []
        if Event.RECV_REQUEST not in self._steps[self.state]:
            return []
        return self._resend_last()

    def send_response(self, response: Response, now: float) -> list[Effect]:
        """Send a response from the TU: ``[Transmit(response)]``, plus ``Terminated()`` for a
        final response on a reliable transport.

        Raises:
            TransactionStateError: a final response was already sent, or the transaction is
                terminated.
            ValueError: the status is outside 100-699.
        """
        event = _send_event(response.status)
        nxt = self._tu_step(event)
        sent = self._record(response, nxt)
        if event is Event.SEND_1XX:
            return [sent]
        if self.reliable:
            return [sent, *self._expire(Event.TIMER_J)]
        self._arm_end(Event.TIMER_J, now + self.timers.timer_j)
        return [sent]

    def _retransmit(self, now: float) -> list[Effect]:
        self._retx_at = None
        return []
