"""The transaction-stateful proxy, as a sans-IO state machine.

Theory of operation
-------------------
Bytes come in with ``receive(data, source, now)``; what must go out is collected from
``data_to_send()``, what the owner must know or do from ``next_event()``, and time moves only
through ``handle_timer(now)`` at the deadline ``get_timer()`` names. Nothing here opens a
socket or reads a clock, so every path, failover and fail-open included, is tested with
injected time (the aioquic pattern).

- Requests (RFC 3261 §16.3–16.6). A new request gets a server transaction (§17.2).
  Max-Forwards 0 is answered 483. Our Route entries are popped (§16.4); an in-dialog request
  follows the remaining Route or its Request-URI; an initial one is classified: an emergency
  INVITE (RFC 6881 §5) goes to the emergency trunks, anything else to the default trunks.
  OPTIONS addressed to us is answered 200 here (softswitch keepalive), 503 while the owner
  drains the process (``draining``).
- The 100 Trying to an INVITE goes *after* the forwarded INVITE: the INVITE is what the
  call waits for, the 100 only stops the caller's retransmissions. An INVITE answered at
  once with a final response (483, 481, 503) gets none. An emergency INVITE's 100 is held
  until the INVITE leaves (the owner hands it back, or fail-open), but no longer than
  ``trying_after`` (§17.2.1 asks for one within 200 ms); a retransmitted INVITE gets it at
  once, since a retransmission must be answered; none goes after a final response.
- Emergency INVITEs are handed to the owner as an :class:`EmergencyCall` event so that the
  location lookup and enrichment, which need I/O, happen outside. The owner calls
  :meth:`ProxyCore.forward_emergency` with the request to send. If it does not do so by the
  fail-open deadline, the core forwards the request as received: a 911 call never waits on
  a lookup or a bug in enrichment.
- Each attempt at a trunk is a branch: a client transaction (§17.1) with its own
  ``z9hG4bK`` branch. Trunks are tried in order: a transport error, 408, 5xx, 6xx, or no
  provisional response within ``provisional_timeout`` moves the call to the next trunk
  instead of waiting for Timer B's 32 s. A branch abandoned for silence stays alive: if it
  wakes up with a provisional it is cancelled (§9.1), and a late 2xx is still forwarded
  (§16.7 step 5 forwards every 2xx).
- Responses (§16.7): 100 is never forwarded; other provisionals reset Timer C (§16.8, above
  3 minutes) and are forwarded; 2xx are forwarded at once; when no branch is left, the best
  final response goes upstream, a 503 becoming 500 (§16.7 step 6).
- CANCEL (§16.10) is answered 200 and cancels each branch that has had a provisional; a
  branch that has not is cancelled as soon as one arrives. ACK for a non-2xx is absorbed by
  the server transaction (hop-by-hop); ACK for a 2xx, like any request without a context,
  is forwarded statelessly with a branch derived from the incoming one (§16.11).
- Trunk health (:mod:`e911_sip.proxy.trunks`): each probed trunk gets an OPTIONS every probe
  interval, as a client non-INVITE transaction abandoned at its own shorter probe timeout.
  Probe results and call outcomes (transport error, timeout, no provisional; any response)
  move a trunk down or up, reported as :class:`TrunkStateChanged`; a new call's trunks are
  tried up ones first, down ones last, none skipped.
- Overload (:mod:`e911_sip.proxy.admission`): the server, client and context tables are
  bounded. A request that would create a server transaction while a table is at its bound,
  or a new non-emergency one while the owner's load signal or the count of working
  transactions (those still waiting for a final response) says shed, gets a stateless 503
  with Retry-After: no transaction, no retransmission cycle. An emergency INVITE (and a
  BYE, which ends a call) is never refused: it evicts finished transactions, oldest first,
  then the oldest non-emergency state. The ACK of such a 503 ends here.
- State and time: each branch and each response context is one explicit state, changed only
  through ``BRANCH_TRANSITIONS`` and ``CONTEXT_TRANSITIONS``; every deadline (transactions,
  Timer C, the provisional timeout, fail-open and the held 100 Trying, probes) sits on one
  coarse timer wheel (:mod:`e911_sip.proxy.wheel`, 1/64 s ticks, never early). The common
  messages take fast paths (``ProxyOptions.fast_paths``) with the same result as the
  general handling.
- Nothing a peer sends makes this code raise: malformed input is answered 400 (or the code
  its error implies) when it can be answered and dropped when it cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Final, Generic, TypeVar

from e911_sip.proxy.routing import (
    DIALOG_CREATING,
    BranchFactory,
    LocalAddress,
    Tokens,
    add_record_route,
    add_via,
    decrement_max_forwards,
    is_local_uri,
    next_hop,
    own_routes,
    pop_own_routes,
    route_stamp,
    stamp_received,
)
from e911_sip.proxy.trunks import ProbeOptions, TrunkHealth, build_probe
from e911_sip.proxy.trust import (
    IDENTITY_HEADERS,
    LOOPBACK_SOURCES,
    IPNetwork,
    TrunkDialogs,
    Trust,
    TrustPolicy,
    is_ip_address,
)
from e911_sip.proxy.wheel import TimerWheel
from e911_sip.sip.errors import RemoteSipError, SipError, TooManyHops, TransactionStateError
from e911_sip.sip.message import (
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_SIZE,
    Edit,
    ParseFailure,
    Request,
    Response,
    error_response,
    make_response,
    parse,
)
from e911_sip.sip.peer import Peer, peer_for_uri, response_peer
from e911_sip.sip.transaction import (
    MAGIC_COOKIE,
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    PassUp,
    ServerInviteTransaction,
    ServerKey,
    ServerNonInviteTransaction,
    Terminated,
    Timeout,
    TimerSettings,
    Transmit,
    TransportFailure,
    build_cancel,
    by_state,
    client_key,
    server_key,
    via_branch,
    via_sent_by,
)
from e911_sip.sip.transaction import State as TransactionState
from e911_sip.sip.uri import (
    Uri,
    param_of,
    parse_name_addr,
    parse_uri,
    parse_via,
    split_values,
    uri_hostport,
)

ClientTransaction = ClientInviteTransaction | ClientNonInviteTransaction
ServerTransaction = ServerInviteTransaction | ServerNonInviteTransaction


class Route(StrEnum):
    """How a request was routed; a label on the request counter."""

    EMERGENCY = "emergency"
    DEFAULT = "default"
    IN_DIALOG = "in_dialog"
    ROUTE_SET = "route_set"
    LOCAL = "local"
    STATELESS = "stateless"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyOptions:
    """What the proxy core needs to know; built by the application from its config."""

    local: tuple[LocalAddress, ...]
    """Our listening addresses, one per transport, as advertised in Via and Record-Route."""
    emergency_classifier: Callable[[Uri], str | None] = lambda _uri: None
    """Returns the emergency number a Request-URI dials, or None (the policy layer's
    ``emergency_number``, bound to the configured numbers, in production)."""
    emergency_trunks: tuple[str, ...] = ()
    """SIP URIs of the emergency trunks, tried in order."""
    default_trunks: tuple[str, ...] = ()
    """SIP URIs for every other initial request, tried in order."""
    provisional_timeout: float = 2.0
    """Seconds a trunk has to send any provisional to an INVITE before the next is tried."""
    fail_open_after: float = 0.5
    """Seconds the owner has to return an enriched emergency INVITE before the original goes."""
    trying_after: float = 0.1
    """Seconds an emergency INVITE's 100 Trying is held while the owner looks the caller up:
    normally it goes just after the forwarded INVITE; a slow lookup sends it at this deadline
    instead (RFC 3261 §17.2.1 asks for one within 200 ms)."""
    timer_c: float = 185.0
    """RFC 3261 §16.6 step 11 Timer C for INVITE branches; must exceed 3 minutes."""
    timers: TimerSettings = field(default_factory=TimerSettings)
    """T1, T2, T4 for the transactions."""
    max_message_size: int = DEFAULT_MAX_SIZE
    """Largest message accepted, in bytes."""
    max_headers: int = DEFAULT_MAX_HEADERS
    """Largest number of header fields accepted."""
    server_header: str | None = "e911-sip"
    """Server header on responses we generate ourselves; None writes none."""
    trusted_sources: tuple[IPNetwork, ...] = LOOPBACK_SOURCES
    """Networks of the softswitch: the only sources whose initial requests are routed."""
    reject_untrusted: bool = False
    """Answer refused requests with a stateless 403; False drops them silently."""
    keep_device_geolocation: bool = False
    """Pass a Geolocation that arrived with an emergency call on to the trunk (RFC 6442
    UA-provided location); False removes it, and its Geolocation-Routing, before enrichment."""
    max_trunk_dialogs: int = 100_000
    """Dialogs a trunk answered that it may send in-dialog requests in (bounded table)."""
    dialog_key: bytes | None = None
    """Secret behind our branches, tags and Record-Route stamps, shared by the processes
    that must finish each other's calls (the workers of one edge; an edge and its restart).
    None: a key made per process, so only this process recognises what it made."""
    trunk_dialog_max_age: float = 14_400.0
    """Seconds without a message after which such a dialog is forgotten."""
    emergency_probe: ProbeOptions = field(default_factory=ProbeOptions)
    """OPTIONS probing of the emergency trunks (off unless its interval is set)."""
    default_probe: ProbeOptions = field(default_factory=ProbeOptions)
    """OPTIONS probing of the default trunks; a trunk on both lists is probed as an
    emergency trunk."""
    max_transactions: int = 150_000
    """Server plus client transactions kept at most, finished ones included. At the bound, a
    new request takes the place of the oldest finished transactions; with none finished it
    gets a stateless 503, except an emergency INVITE or a BYE, which evict the oldest
    non-emergency state. An emergency call's transactions are never evicted, finished or
    not: they go over the bound and end by their timers."""
    shed_transactions: int = 100_000
    """Working transactions (still waiting for their final response) above which new
    non-emergency initial requests get a stateless 503. Finished ones, which only absorb
    retransmissions until their timer ends them, are memory, not work: they do not count."""
    max_contexts: int = 50_000
    """Requests being proxied (response contexts) kept at most; at the bound, as above."""
    overload: Callable[[], str | None] = lambda: None
    """Why new non-emergency work must be refused now (``lag``, ``queue``), or None: the
    owner's :class:`~e911_sip.proxy.admission.LoadSignal`, in production."""
    retry_after: int = 5
    """Seconds in the Retry-After of a 503 sent when shedding load."""
    fast_paths: bool = True
    """Take the short paths for the common messages: a retransmission its server transaction
    absorbs, an in-dialog request whose top Route is the one we recorded, a response to one
    of our branches. False sends every message through the general handling. Both give the
    same result (the core's tests run each of them); the switch is there to prove it."""


# -- events for the owner ----------------------------------------------------------------
# Plain (not frozen) slotted dataclasses: several are made per message, and a frozen one
# pays an object.__setattr__ per field. They are values all the same; nothing mutates them.
# Each writes out its __init__ (dataclass keeps one the class defines): compiled, that one is
# native, where the one dataclass generates runs as Python, three times the cost of a call.


@dataclass(slots=True)
class RequestRouted:
    """A new request (not a retransmission) was routed."""

    method: str
    route: Route

    def __init__(self, method: str, route: Route) -> None:
        self.method = method
        self.route = route


@dataclass(slots=True)
class EmergencyCall:
    """An emergency INVITE waits for :meth:`ProxyCore.forward_emergency`."""

    call: int
    """Handle to pass back."""
    request: Request
    """The request as it will be forwarded unless the owner returns another."""
    number: str
    """The emergency number dialled (911 or 933; urn:service:sos maps to 911)."""
    call_id: str
    removed_geolocation: tuple[str, ...] = ()
    """Geolocation values the call arrived with and that were removed (not ours to pass on)."""

    def __init__(
        self,
        call: int,
        request: Request,
        number: str,
        call_id: str,
        removed_geolocation: tuple[str, ...] = (),
    ) -> None:
        self.call = call
        self.request = request
        self.number = number
        self.call_id = call_id
        self.removed_geolocation = removed_geolocation


@dataclass(slots=True)
class EmergencyForwarded:
    """An emergency INVITE left for a trunk."""

    call: int
    call_id: str
    trunk: str
    attempt: int
    """1 for the first trunk, 2 after one failover, ..."""
    enriched: bool
    """False when the original request went (fail-open deadline, or the owner said so)."""

    def __init__(self, call: int, call_id: str, trunk: str, attempt: int, enriched: bool) -> None:
        self.call = call
        self.call_id = call_id
        self.trunk = trunk
        self.attempt = attempt
        self.enriched = enriched


@dataclass(slots=True)
class FailOpen:
    """The owner did not return an enriched emergency INVITE in time; the original went."""

    call: int
    call_id: str

    def __init__(self, call: int, call_id: str) -> None:
        self.call = call
        self.call_id = call_id


@dataclass(slots=True)
class Failover:
    """A trunk failed a call and the next one is tried."""

    call_id: str
    emergency: bool
    trunk: str
    reason: str
    """``transport``, ``timeout``, ``no_provisional`` or the status code."""

    def __init__(self, call_id: str, emergency: bool, trunk: str, reason: str) -> None:
        self.call_id = call_id
        self.emergency = emergency
        self.trunk = trunk
        self.reason = reason


@dataclass(slots=True)
class CallCompleted:
    """The final response to a routed initial request went upstream."""

    call_id: str
    method: str
    emergency: bool
    status: int
    trunk: str | None

    def __init__(
        self, call_id: str, method: str, emergency: bool, status: int, trunk: str | None
    ) -> None:
        self.call_id = call_id
        self.method = method
        self.emergency = emergency
        self.status = status
        self.trunk = trunk


@dataclass(slots=True)
class Shed:
    """A request was refused with a stateless 503 by overload control; nothing was kept."""

    reason: str
    """``transactions_full``, ``contexts_full``, ``transactions``, or the owner's reason."""
    method: str
    source: Peer

    def __init__(self, reason: str, method: str, source: Peer) -> None:
        self.reason = reason
        self.method = method
        self.source = source


@dataclass(slots=True)
class Evicted:
    """State was dropped to make room at a bound: finished transactions for any new request,
    working non-emergency state for an emergency INVITE or a BYE."""

    transactions: int
    contexts: int

    def __init__(self, transactions: int, contexts: int) -> None:
        self.transactions = transactions
        self.contexts = contexts


@dataclass(slots=True)
class Discarded:
    """A message was dropped or answered with an error by the proxy itself."""

    reason: str
    detail: str
    source: Peer

    def __init__(self, reason: str, detail: str, source: Peer) -> None:
        self.reason = reason
        self.detail = detail
        self.source = source


@dataclass(slots=True)
class Recovered:
    """A message was routed on what it carries, with no state of ours to match it (the
    process that held it died or restarted): a trunk's request in a dialog whose Record-Route
    stamp is ours (``trunk_dialog``), or a 2xx to an INVITE branch of ours (``late_2xx``)."""

    kind: str
    emergency: bool
    """True for an emergency dialog, as the stamp of our Record-Route says."""
    source: Peer
    call_id: str
    method: str
    """The trunk's request (``trunk_dialog``), or ``INVITE`` (``late_2xx``)."""

    def __init__(self, kind: str, emergency: bool, source: Peer, call_id: str, method: str) -> None:
        self.kind = kind
        self.emergency = emergency
        self.source = source
        self.call_id = call_id
        self.method = method


@dataclass(slots=True)
class TrunkProbed:
    """An OPTIONS probe of a trunk has its result."""

    trunk: str
    ok: bool
    result: str
    """``ok``, ``timeout``, ``transport`` or the failing status code."""

    def __init__(self, trunk: str, ok: bool, result: str) -> None:
        self.trunk = trunk
        self.ok = ok
        self.result = result


@dataclass(slots=True)
class TrunkStateChanged:
    """A trunk went down (tried last from now on) or came back up."""

    trunk: str
    up: bool
    reason: str
    """The outcome that decided it: ``ok``, ``timeout``, ``transport``, ``no_provisional``
    or a status code."""

    def __init__(self, trunk: str, up: bool, reason: str) -> None:
        self.trunk = trunk
        self.up = up
        self.reason = reason


Event = (
    RequestRouted
    | EmergencyCall
    | EmergencyForwarded
    | FailOpen
    | Failover
    | CallCompleted
    | Shed
    | Evicted
    | Discarded
    | Recovered
    | TrunkProbed
    | TrunkStateChanged
)


@dataclass(slots=True)  # its __init__ written out, as the events' are
class Outgoing:
    """Bytes for the transport to send."""

    data: bytes
    peer: Peer
    branch: str | None = None
    """The client transaction this belongs to, for reporting transport errors back."""

    def __init__(self, data: bytes, peer: Peer, branch: str | None = None) -> None:
        self.data = data
        self.peer = peer
        self.branch = branch


# -- per-request state -------------------------------------------------------------------
# A branch and a response context are each one explicit state, changed only through the
# tables below (h11's and sip/transaction.py's rule: reading one table answers "what can
# happen now"). A pair missing from a table is an event that came too late to matter (a
# second final response, a CANCEL after the answer) and is ignored: nothing a peer sends
# may make the core raise.


class BranchState(Enum):
    """Where one attempt at one target stands (RFC 3261 §16.6–16.8, §9.1)."""

    CALLING = "calling"
    """The request is out; nothing heard yet (the provisional timeout runs)."""
    CANCEL_PENDING = "cancel pending"
    """The call was cancelled before this branch heard anything: the CANCEL waits for a
    provisional response (§9.1)."""
    ABANDONED = "abandoned"
    """Silent past the provisional timeout: the next trunk was tried, this one is left
    alive (a late 2xx is still forwarded) but no longer counts toward the best response."""
    PROCEEDING = "proceeding"
    """A provisional response came; Timer C runs (§16.8)."""
    CANCELLING = "cancelling"
    """The CANCEL went; its final response is awaited for at most 64*T1 (§9.1)."""
    ABANDONED_CANCELLING = "abandoned cancelling"
    """An abandoned branch woke up with a provisional and was cancelled at once."""
    DONE = "done"
    """A final response, a timeout or a transport error ended it."""

    __hash__ = object.__hash__


class BranchEvent(Enum):
    """What can happen to a branch."""

    PROVISIONAL = "1xx"
    SUCCESS = "2xx"
    FAILURE = "300-699"
    FAILED = "timeout or transport error"
    NO_PROVISIONAL = "provisional timeout"
    CANCEL = "cancel"
    TIMER_C = "Timer C"

    __hash__ = object.__hash__


class ContextState(Enum):
    """Where a response context (RFC 3261 §16) stands."""

    PROXYING = "proxying"
    """Routed (or being routed); branches may be out; no final response went upstream."""
    AWAITING_OWNER = "awaiting owner"
    """An emergency INVITE waits for the owner's enriched request or the fail-open deadline."""
    CANCELLED = "cancelled"
    """A CANCEL came (§16.10): the branches are cancelled, their final responses awaited."""
    FINISHED = "finished"
    """The final response went upstream (or the server transaction ended without one)."""

    __hash__ = object.__hash__


class ContextEvent(Enum):
    """What can happen to a response context."""

    AWAIT_OWNER = "emergency call handed to the owner"
    RESUME = "owner answered or fail-open"
    CANCEL = "CANCEL"
    FINAL = "final response sent"
    SERVER_GONE = "server transaction ended"

    __hash__ = object.__hash__


_B = BranchState
_BE = BranchEvent
_C = ContextState
_CE = ContextEvent

BRANCH_TRANSITIONS: dict[tuple[BranchState, BranchEvent], BranchState] = {
    (_B.CALLING, _BE.PROVISIONAL): _B.PROCEEDING,
    (_B.CALLING, _BE.SUCCESS): _B.DONE,
    (_B.CALLING, _BE.FAILURE): _B.DONE,
    (_B.CALLING, _BE.FAILED): _B.DONE,
    (_B.CALLING, _BE.NO_PROVISIONAL): _B.ABANDONED,
    (_B.CALLING, _BE.CANCEL): _B.CANCEL_PENDING,
    (_B.CANCEL_PENDING, _BE.PROVISIONAL): _B.CANCELLING,
    (_B.CANCEL_PENDING, _BE.SUCCESS): _B.DONE,
    (_B.CANCEL_PENDING, _BE.FAILURE): _B.DONE,
    (_B.CANCEL_PENDING, _BE.FAILED): _B.DONE,
    (_B.CANCEL_PENDING, _BE.NO_PROVISIONAL): _B.ABANDONED,
    (_B.CANCEL_PENDING, _BE.CANCEL): _B.CANCEL_PENDING,
    # An abandoned branch is cancelled on its first provisional anyway.
    (_B.ABANDONED, _BE.PROVISIONAL): _B.ABANDONED_CANCELLING,
    (_B.ABANDONED, _BE.SUCCESS): _B.DONE,
    (_B.ABANDONED, _BE.FAILURE): _B.DONE,
    (_B.ABANDONED, _BE.FAILED): _B.DONE,
    (_B.ABANDONED, _BE.CANCEL): _B.ABANDONED,
    # Each further provisional resets Timer C (§16.7 step 2).
    (_B.PROCEEDING, _BE.PROVISIONAL): _B.PROCEEDING,
    (_B.PROCEEDING, _BE.SUCCESS): _B.DONE,
    (_B.PROCEEDING, _BE.FAILURE): _B.DONE,
    (_B.PROCEEDING, _BE.FAILED): _B.DONE,
    (_B.PROCEEDING, _BE.CANCEL): _B.CANCELLING,
    (_B.PROCEEDING, _BE.TIMER_C): _B.CANCELLING,
    (_B.CANCELLING, _BE.PROVISIONAL): _B.CANCELLING,
    (_B.CANCELLING, _BE.SUCCESS): _B.DONE,
    (_B.CANCELLING, _BE.FAILURE): _B.DONE,
    (_B.CANCELLING, _BE.FAILED): _B.DONE,
    (_B.CANCELLING, _BE.TIMER_C): _B.DONE,
    (_B.ABANDONED_CANCELLING, _BE.PROVISIONAL): _B.ABANDONED_CANCELLING,
    (_B.ABANDONED_CANCELLING, _BE.SUCCESS): _B.DONE,
    (_B.ABANDONED_CANCELLING, _BE.FAILURE): _B.DONE,
    (_B.ABANDONED_CANCELLING, _BE.FAILED): _B.DONE,
    (_B.ABANDONED_CANCELLING, _BE.TIMER_C): _B.DONE,
    # Every 2xx goes upstream (§16.7 step 5), retransmissions included (RFC 6026 §8.4).
    (_B.DONE, _BE.SUCCESS): _B.DONE,
}
"""Every transition of a branch: (state, event) -> next state. Missing pairs are ignored."""

CONTEXT_TRANSITIONS: dict[tuple[ContextState, ContextEvent], ContextState] = {
    (_C.PROXYING, _CE.AWAIT_OWNER): _C.AWAITING_OWNER,
    (_C.PROXYING, _CE.CANCEL): _C.CANCELLED,
    (_C.PROXYING, _CE.FINAL): _C.FINISHED,
    (_C.AWAITING_OWNER, _CE.RESUME): _C.PROXYING,
    (_C.AWAITING_OWNER, _CE.CANCEL): _C.CANCELLED,
    (_C.AWAITING_OWNER, _CE.FINAL): _C.FINISHED,
    (_C.CANCELLED, _CE.FINAL): _C.FINISHED,
    # Only a transport failure ends a server transaction before its final response.
    (_C.PROXYING, _CE.SERVER_GONE): _C.FINISHED,
    (_C.AWAITING_OWNER, _CE.SERVER_GONE): _C.FINISHED,
    (_C.CANCELLED, _CE.SERVER_GONE): _C.FINISHED,
}
"""Every transition of a response context: (state, event) -> next state. Missing pairs are
ignored (a CANCEL or a final response after the final response)."""


_BRANCH_NEXT: Final = by_state(BranchState, BRANCH_TRANSITIONS)
"""``BRANCH_TRANSITIONS`` by state, then event (what :meth:`_Branch.step` reads)."""
_CONTEXT_NEXT: Final = by_state(ContextState, CONTEXT_TRANSITIONS)
"""``CONTEXT_TRANSITIONS`` by state, then event (what :meth:`_Context.step` reads)."""

_NO_PROVISIONAL_YET: Final = frozenset({_B.CALLING, _B.CANCEL_PENDING, _B.ABANDONED})
_COUNTING: Final = frozenset({_B.CALLING, _B.CANCEL_PENDING, _B.PROCEEDING, _B.CANCELLING})
"""Branches whose final response may still decide the context's (not abandoned, not done)."""
_CANCEL_SENT: Final = frozenset({_B.CANCELLING, _B.ABANDONED_CANCELLING})
_OPEN: Final = frozenset({_C.PROXYING, _C.AWAITING_OWNER})
"""Contexts neither cancelled nor finished: provisionals go upstream, failover may happen."""
_REPORTED: Final = frozenset({Route.EMERGENCY, Route.DEFAULT, Route.ROUTE_SET})
"""Routes of the initial requests whose final response is reported (:class:`CallCompleted`):
every call the owner may wait for in a drain, a preloaded route set's included."""


class _Branch:
    """One attempt at one target: a client transaction plus the proxy's timers for it."""

    __slots__ = (
        "context",
        "txn",
        "peer",
        "trunk",
        "state",
        "provisional_deadline",
        "timer_c_deadline",
        "dialog_noted",
    )

    def __init__(self, context: _Context, txn: ClientTransaction, peer: Peer, trunk: str) -> None:
        self.context = context
        self.txn = txn
        self.peer = peer
        self.trunk = trunk
        self.state = BranchState.CALLING
        self.provisional_deadline: float | None = None
        self.timer_c_deadline: float | None = None
        self.dialog_noted = False
        """The trunk dialog table has seen this branch's first answer."""

    def step(self, event: BranchEvent) -> BranchState | None:
        """Apply ``event``; the new state, or None when the event is ignored here."""
        nxt = _BRANCH_NEXT[self.state].get(event)
        if nxt is not None:
            self.state = nxt
        return nxt


class _Held:
    """What a response context holds only until it is forgotten: a finished call lingers for
    Timer L with only what forwarding a 2xx retransmission or an ACK reads."""

    __slots__ = ("request", "template", "trunks", "responses", "stamp")

    def __init__(self, request: Request) -> None:
        self.request = request
        """The request as received (received/rport stamped): responses are built from it."""
        self.template: Request = request
        """The request to forward, before the per-branch Via and Request-URI."""
        self.stamp: str | None = None
        """The dialog stamp of a request that creates a dialog (None for any other): each
        branch adds our Record-Route with it to the template, one entry or, when the
        branch's transport differs from the caller's, two (RFC 5658). So the template is
        copied once per branch (the Via's copy), an emergency call's Record-Route goes on
        whatever request the owner handed back, and no branch removes a Record-Route to
        write two."""
        self.trunks: list[str] = []
        self.responses: list[Response] = []
        """Final responses collected so far, already fit to go upstream."""


class _Context:
    """A response context (RFC 3261 §16): one server transaction and its branches."""

    __slots__ = (
        "id",
        "server",
        "source",
        "held",
        "route",
        "emergency_number",
        "attempt",
        "branches",
        "state",
        "fail_open_deadline",
        "trying_deadline",
        "enriched",
        "inbound",
        "initial",
        "upstream",
    )

    def __init__(
        self,
        ident: int,
        server: ServerTransaction,
        source: Peer,
        request: Request,
        inbound: LocalAddress,
    ) -> None:
        self.id = ident
        self.server = server
        self.source = source
        self.held: _Held | None = _Held(request)
        """None once the context is forgotten (``ProxyCore._maybe_forget``): one reference
        dropped, where deleting four attributes was four generic calls compiled. A stray
        read of what it held then fails loudly instead of using stale state."""
        self.route = Route.DEFAULT
        self.emergency_number: str | None = None
        self.attempt = 0
        self.branches: tuple[_Branch, ...] = ()
        """A tuple: the empty one, which a forgotten context keeps, is shared."""
        self.state = ContextState.PROXYING
        self.fail_open_deadline: float | None = None
        self.trying_deadline: float | None = None
        """While an INVITE's 100 Trying is held (an emergency call waiting for the owner):
        when it must go at the latest. It shares the context's wheel slot with the
        fail-open deadline."""
        self.enriched = False
        self.inbound = inbound
        self.initial: bool | None = None
        """No To tag (an initial request); None until read, or when the To is unreadable."""
        self.upstream: Peer | None = None
        """Where responses go, as its server transaction sends them; a 2xx that comes after
        that transaction ended goes there directly."""

    def _held(self) -> _Held:
        held = self.held
        if held is None:
            raise AttributeError(f"context {self.id} is forgotten: it holds no request")
        return held

    # Properties, so the call paths read these as they did when they were attributes.
    @property
    def request(self) -> Request:
        """The request as received (:attr:`_Held.request`)."""
        return self._held().request

    @property
    def template(self) -> Request:
        """The request to forward (:attr:`_Held.template`)."""
        return self._held().template

    @template.setter
    def template(self, value: Request) -> None:
        self._held().template = value

    @property
    def trunks(self) -> list[str]:
        """The trunks left to try, in order (:attr:`_Held.trunks`)."""
        return self._held().trunks

    @trunks.setter
    def trunks(self, value: list[str]) -> None:
        self._held().trunks = value

    @property
    def responses(self) -> list[Response]:
        """Final responses collected so far (:attr:`_Held.responses`)."""
        return self._held().responses

    def step(self, event: ContextEvent) -> ContextState | None:
        """Apply ``event``; the new state, or None when the event is ignored here."""
        nxt = _CONTEXT_NEXT[self.state].get(event)
        if nxt is not None:
            self.state = nxt
        return nxt


class _ServerEntry:
    __slots__ = ("txn", "context", "peer", "done")

    def __init__(self, txn: ServerTransaction, context: _Context | None, peer: Peer) -> None:
        self.txn = txn
        self.context = context
        self.peer = peer
        """Where responses go (RFC 3261 §18.2.2)."""
        self.done = False
        """The transaction is finished and counted in ``ProxyCore._done``."""


class _ClientEntry:
    __slots__ = ("txn", "branch", "peer", "probe", "upstream_via", "done")

    def __init__(
        self,
        txn: ClientTransaction,
        branch: _Branch | None,
        peer: Peer,
        probe: _Probe | None = None,
    ) -> None:
        self.txn = txn
        self.branch = branch
        """The branch whose responses matter; None for a CANCEL or a probe we sent."""
        self.peer = peer
        self.probe = probe
        """Set for an OPTIONS probe of a trunk: its result goes to the trunk health."""
        self.upstream_via: str | None = None
        """The Via below ours as we sent it, already parsed once: a response repeating it
        needs no second check that it parses."""
        self.done = False
        """The transaction is finished and counted in ``ProxyCore._done``."""


class _Probe:
    """One OPTIONS probe in flight: its trunk, its transaction and its own deadline."""

    __slots__ = ("trunk", "key", "deadline", "done")

    def __init__(self, trunk: str, key: tuple[str, str], deadline: float) -> None:
        self.trunk = trunk
        self.key = key
        self.deadline = deadline
        self.done = False


_FRONT_STEP: Final = 4
"""Slots an ``add`` may pass over: more than the one it adds, so the front catches up after
a burst of items leaving together."""

_CUT_AFTER: Final = 1024
"""Cleared slots at the front of an :class:`_AgeList` before it is cut (once they are also
more than half of it): the cut is one memmove of the rest, paid every so often."""

_Item = TypeVar("_Item")


class _AgeList(Generic[_Item]):
    """Items oldest first, each leaving by a mark on itself, not by a search of the list.

    Not a dict: its oldest key is found by scanning past every slot deleted at its front
    since its last resize (100,000 evictions from a 150,000-entry dict took 25 s). Nor an
    ``OrderedDict``, whose insertion and removal cost about 2,000 instructions each,
    compiled. Here an item that leaves is marked (:meth:`_left`) and stays in its slot until
    the front passes it, clearing the slot as it goes: a few slots at each ``add`` and as
    many as needed by ``oldest``. The list is usually the last holder of what left, so each
    is let go of one at a time (letting tens of thousands go in one call once stalled the
    event loop for 0.2 s), and the list is cut only once its front is cleared slots. Items
    are added in about the order they leave and live a bounded time, so what waits behind
    the oldest one still counted is bounded by that much traffic.
    """

    __slots__ = ("_slots", "_head")

    def __init__(self) -> None:
        self._slots: list[_Item | None] = []
        self._head = 0
        """Index of the oldest slot that may still hold an item: those before are cleared."""

    def oldest(self) -> _Item | None:
        """The oldest item that has not left, or None."""
        self._advance(len(self._slots))
        head = self._head
        slots = self._slots
        return slots[head] if head < len(slots) else None

    def _left(self, item: _Item) -> bool:
        """True when ``item`` has left: the front may pass it and clear its slot."""
        raise NotImplementedError

    def _cut(self, count: int) -> None:
        """The first ``count`` slots were cut off the list (all cleared)."""

    def _advance(self, limit: int) -> None:
        """Move the front past at most ``limit`` slots that left, clearing them."""
        slots = self._slots
        head = self._head
        size = len(slots)
        stop = min(size, head + limit)
        while head < stop:
            item = slots[head]
            if item is not None and not self._left(item):
                break
            slots[head] = None
            head += 1
        if head > _CUT_AFTER and head * 2 > size:
            del slots[:head]  # cleared slots only: nothing is freed here
            self._cut(head)
            head = 0
        self._head = head


class _Finished(_AgeList[_ServerEntry | _ClientEntry]):
    """The entries whose transaction is finished, oldest first, and how many there are.

    An entry leaves by its ``done`` flag (it ended, or left its table): transactions finish
    in about the order they started and live at most 64*T1.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        """Entries with ``done`` set: finished and still in their table."""

    def hold(self, entry: _ServerEntry | _ClientEntry) -> None:
        """Count ``entry`` as finished without ever offering it for eviction: what an
        emergency call's transaction absorbs (a 911 INVITE retransmitted because the 200 or
        the 486 was lost) must not be taken for a new call because ordinary traffic filled
        the table. Those end by their own timers, and there are few of them."""
        entry.done = True
        self.count += 1

    def add(self, entry: _ServerEntry | _ClientEntry) -> None:
        entry.done = True
        self.count += 1
        self._slots.append(entry)
        # Entries leave about as often as they are added: passing a few here keeps the
        # front moving, one freed entry at a time, without a long pass in any one call.
        self._advance(_FRONT_STEP)

    def remove(self, entry: _ServerEntry | _ClientEntry) -> None:
        """Uncount ``entry`` (it left its table); it stays in the list until passed over."""
        if entry.done:
            entry.done = False
            self.count -= 1

    def _left(self, item: _ServerEntry | _ClientEntry) -> bool:
        return not item.done


class _Evictable(_AgeList[_Context]):
    """The contexts ``ProxyCore._make_room`` may evict (none an emergency call's), oldest
    first.

    Indexed by context id less ``_base`` (ids rise by one per context): a context leaves by
    its slot being cleared (:meth:`remove`), and the ids of contexts never offered
    (emergency calls', requests ended before they were routed) are cleared slots from the
    start.
    """

    __slots__ = ("_base",)

    def __init__(self) -> None:
        super().__init__()
        self._base = 1
        """The id of the context of ``_slots[0]`` (the first context's id is 1)."""

    def add(self, context: _Context) -> None:
        """Offer ``context``, created after every context offered before it."""
        slots = self._slots
        index = context.id - self._base
        added = index + 1 - len(slots)
        while len(slots) < index:
            slots.append(None)
        slots.append(context)
        self._advance(added + _FRONT_STEP)

    def remove(self, context: _Context) -> None:
        """Withdraw ``context`` (it ended or was evicted), if it was offered."""
        index = context.id - self._base
        slots = self._slots
        if 0 <= index < len(slots):
            slots[index] = None

    def _left(self, item: _Context) -> bool:
        return False  # a context that left has its slot cleared already

    def _cut(self, count: int) -> None:
        self._base += count


def _rfc3261_key(request: Request) -> ServerKey | None:
    """The server transaction key of a request with an RFC 3261 branch, else None.

    Read from the request as received, it is also the key of the stamped request:
    received/rport change neither the branch nor the sent-by, only an RFC 2543 key (which
    includes the whole Via, so it is left to the general path).
    """
    via = request.top_via
    branch = via_branch(via)
    if branch is None or not branch.startswith(MAGIC_COOKIE):
        return None
    # server_key's RFC 3261 case, without reading the branch a second time.
    method = request.method
    return branch, via_sent_by(via), "INVITE" if method == "ACK" else method


_PEERS_SIZE: Final = 1024
"""How many targets :meth:`ProxyCore._peer_for` remembers before it starts again."""


def _reliable(peer: Peer) -> bool:
    """``peer.reliable``, as a native call: Peer is a NamedTuple, not a native class, so even
    compiled its property is a generic attribute lookup per message."""
    return peer.transport != "udp"


def _below_top_via(response: Response, expected: str | None) -> bool:
    """True when the Via below the response's top one is ``expected``, as the second of
    ``response.values("via")`` would be, read in place on the one Via line instead of
    splitting all of it. False means only "not known here": the caller then splits the line.
    """
    if not expected or response.count("via") != 1:
        return False
    value = response.get("via") or ""
    if '"' in value or "<" in value:
        return False  # quoting: split_values has its own rules
    # Without quotes split_values splits at every comma and strips the parts (the top Via
    # and ``expected`` are such parts: no comma, no surrounding space). So the line is the
    # top Via, a comma, an optional space, ``expected``, then its end or a comma (optionally
    # after a space); any other spelling is left to the split.
    # Indexing and slices, not startswith(x, start): that form is a generic call when compiled.
    top = response.top_via.raw
    at = len(top)
    size = len(value)
    if at >= size or value[at] != "," or not value.startswith(top):
        return False
    at += 2 if at + 1 < size and value[at + 1] == " " else 1
    end = at + len(expected)
    if value[at:end] != expected:
        return False
    return end == size or value[end] == "," or value[end : end + 2] == " ,"


def _is_failover_status(status: int) -> bool:
    return status == 408 or status >= 500


def _response_rank(response: Response) -> tuple[int, int]:
    # §16.7 step 6: a 6xx wins; otherwise the lowest class. min() keeps the earliest on ties.
    status = response.status
    if status >= 600:
        return (0, 0)
    return (1, status // 100)


class ProxyCore:
    """The stateful proxy. One instance serves every transport of one edge process."""

    draining: bool = False
    """Set by the owner while the process drains: OPTIONS addressed to us is answered 503
    with Retry-After, so the softswitch's keepalive takes this host out of its route list;
    every call that still comes is served as usual."""

    def __init__(self, *, options: ProxyOptions, entropy: Callable[[int], bytes]) -> None:
        """``entropy(n)`` returns ``n`` unpredictable bytes (``os.urandom`` in the product): the
        core reads no randomness of its own, so tests can make it deterministic."""
        if not options.local:
            raise ValueError("the proxy needs at least one local address")
        self._options = options
        self._locals = options.local
        self._by_transport = {local.transport: local for local in options.local}
        self._tokens = Tokens(entropy)
        self._branches = BranchFactory(self._tokens, options.dialog_key)
        self._trust = TrustPolicy(
            trusted_sources=options.trusted_sources,
            trunk_hosts=[
                parse_uri(t).host for t in (*options.emergency_trunks, *options.default_trunks)
            ],
        )
        self._trunk_dialogs = TrunkDialogs(
            max_entries=options.max_trunk_dialogs, max_age=options.trunk_dialog_max_age
        )
        self._server: dict[tuple[str, str, str], _ServerEntry] = {}
        self._client: dict[tuple[str, str], _ClientEntry] = {}
        self._contexts: dict[int, _Context] = {}
        self._evictable = _Evictable()
        """The contexts of ``_contexts`` that are not emergency calls, oldest first: what
        ``_make_room`` evicts once no finished transaction is left. Kept apart so that making
        room never walks the working emergency calls (with a slow PSAP, 911 calls ring for
        minutes)."""
        self._done = _Finished()
        """The entries of both tables whose transaction is finished, oldest first: what
        ``_make_room`` evicts first, and what the shedding count leaves out (kept as they
        finish and leave, so counting costs nothing per message)."""
        self._last_id = 0
        """The id of the last context made (a plain int: next() on a count is a generic call)."""
        self._outbox: list[Outgoing] = []
        self._events: list[Event] = []
        """Events not yet collected, from ``_event_head`` on: a list read from an index
        rather than a deque, because compiled a list's append is a native call and a
        deque's a generic method call (about ten events per call)."""
        self._event_head = 0
        self._fast = options.fast_paths
        self._absorbed_fast = 0
        self._own_routes = own_routes(options.local) if options.fast_paths else None
        """Our Record-Route values exactly as written, each one that routing would find ours;
        None when the fast paths are off, and every top Route is parsed."""
        self._wheel = TimerWheel()
        # Bound once: a bound method made per timer armed would be an allocation each.
        self._on_branch_timer = self._branch_timer
        self._on_client_timer = self._client_timer
        self._on_server_timer = self._server_timer
        self._on_probe_timer = self._probe_timer
        self._on_probe_deadline = self._probe_deadline
        self._on_context_timer = self._context_timer
        self._probe_slot = object()
        """The wheel's key for the next round of trunk probes."""
        self._created: _Context | None = None
        """The context the message being received created, for answering it on an error."""
        self._trunk_uris = {
            trunk: parse_uri(trunk)
            for trunk in (*options.emergency_trunks, *options.default_trunks)
        }
        self._peers: dict[Uri, Peer] = {}
        """``peer_for_uri`` of the targets sent to lately (:meth:`_peer_for`)."""
        probes = {trunk: options.default_probe for trunk in options.default_trunks}
        probes.update((trunk, options.emergency_probe) for trunk in options.emergency_trunks)
        self._health = TrunkHealth(probes)
        self._arm_probe_timer()

    # -- the sans-IO surface -------------------------------------------------------------
    def data_to_send(self) -> list[Outgoing]:
        """Everything queued for the wire since the last call, in order."""
        out = self._outbox
        self._outbox = []
        return out

    def has_data_to_send(self) -> bool:
        """Whether :meth:`data_to_send` has anything to give. The owner asks after every
        event it handles, and most leave nothing to send: this answers without the new
        list that taking the (empty) outbox costs."""
        return bool(self._outbox)

    def next_event(self) -> Event | None:
        """The oldest event not yet collected, or None."""
        events = self._events
        head = self._event_head
        if head >= len(events):
            return None
        event = events[head]
        head += 1
        if head == len(events):
            events.clear()  # all collected: the list starts again
            head = 0
        self._event_head = head
        return event

    def get_timer(self) -> float | None:
        """The earliest time at which :meth:`handle_timer` must run, or None.

        Deadlines are kept on a timer wheel (:mod:`e911_sip.proxy.wheel`) of 1/64 s ticks:
        this is the earliest tick with a timer in it, never before the timer's deadline.
        """
        return self._wheel.next_deadline()

    @property
    def trust(self) -> TrustPolicy:
        """Who is the softswitch, a trunk or an outsider (shared with the transports)."""
        return self._trust

    @property
    def transactions_in_flight(self) -> int:
        """Server plus client transactions that have not terminated."""
        return len(self._server) + len(self._client)

    @property
    def transactions_working(self) -> int:
        """Transactions still waiting for their final response: the ones in flight less
        those finished and only absorbing retransmissions (what ``shed_transactions``
        counts)."""
        return len(self._server) + len(self._client) - self._done.count

    @property
    def contexts_in_flight(self) -> int:
        """Requests being proxied (response contexts)."""
        return len(self._contexts)

    @property
    def absorbed_fast(self) -> int:
        """Requests a server transaction absorbed on the fast path (retransmissions, ACKs of
        a non-2xx final), neither stamped nor routed: shows the fast path is in use."""
        return self._absorbed_fast

    @property
    def trunk_health(self) -> TrunkHealth:
        """The trunks' health, to read (``status``, ``is_up``); the core alone updates it."""
        return self._health

    @property
    def trunks_by_route(self) -> dict[str, tuple[str, ...]]:
        """The configured trunks of each route (``emergency``, ``default``), in order."""
        return {
            Route.EMERGENCY.value: self._options.emergency_trunks,
            Route.DEFAULT.value: self._options.default_trunks,
        }

    def receive(self, data: bytes, source: Peer, now: float) -> None:
        """Process one datagram or one framed stream message from ``source``."""
        if (
            not self._options.reject_untrusted
            and not data.startswith(b"SIP/2.0 ")
            and self._trust.classify(source.host) is Trust.OUTSIDER
        ):
            # A request from outside the trust domain is dropped whatever it says, so it is
            # not parsed at all: a flood of them costs a dictionary read each. (Responses
            # are parsed: a trusted request may have gone anywhere, and its answer comes
            # from there; only one from that exact address matches.)
            self._events.append(Discarded("untrusted_source", "", source))
            return
        try:
            message = parse(
                data,
                max_size=self._options.max_message_size,
                max_headers=self._options.max_headers,
                datagram=not _reliable(source),
            )
        # One name per handler: compiled code gives a name one type, the first handler's.
        except ParseFailure as failure:
            self._events.append(Discarded("malformed", str(failure), source))
            reply = error_response(failure, to_tag=self._branches.tag())
            if reply is not None:
                self._send_stateless_reply(reply, source)
            return
        except RemoteSipError as unreadable:
            self._events.append(Discarded("unparsable", str(unreadable), source))
            return
        try:
            if isinstance(message, Request):
                self._on_request(message, source, now)
            else:
                self._on_response(message, source, now)
        except SipError as exc:
            # A value read lazily (a Route, a Request-URI) turned out malformed.
            self._events.append(Discarded("malformed", str(exc), source))
            if isinstance(message, Request) and message.method != "ACK":
                status = exc.status_code if isinstance(exc, RemoteSipError) else 400
                reply = make_response(message, status, to_tag=self._branches.tag())
                context = self._created
                if (
                    context is not None
                    and context.state is ContextState.PROXYING
                    and not context.branches
                ):
                    # The request already has a server transaction: answer through it, or
                    # the transaction and its context would wait for a final response
                    # that never comes.
                    self._reply(context, reply, now)
                else:
                    self._send_stateless_reply(reply, source)
        finally:
            self._created = None

    def transport_error(self, branch: str, now: float) -> None:
        """The transport could not deliver a message of the client transaction ``branch``."""
        found = False
        for method in ("INVITE", "CANCEL"):
            entry = self._client.get((branch, method))
            if entry is not None:
                found = True
                self._run_client(entry, entry.txn.transport_error(now), now)
        if found:
            return
        # Other methods (BYE, OPTIONS, ...) are rarer; a scan finds them.
        for key, entry in list(self._client.items()):
            if key[0] == branch:
                self._run_client(entry, entry.txn.transport_error(now), now)

    def handle_timer(self, now: float) -> None:
        """Fire everything due at or before ``now``."""
        wheel = self._wheel
        while due := wheel.pop_due(now):
            for target, fire in due:
                fire(target, now)

    def forward_emergency(
        self, call: int, request: Request, now: float, *, enriched: bool = True
    ) -> None:
        """Send the emergency INVITE ``call`` on as ``request`` (normally the enriched one).

        Late or repeated calls are ignored: the call already went out (fail-open) or ended.
        """
        context = self._contexts.get(call)
        if context is None or context.state is not ContextState.AWAITING_OWNER:
            return
        self._start_emergency(context, request, now, enriched=enriched)

    # -- requests ------------------------------------------------------------------------
    def _on_request(self, request: Request, source: Peer, now: float) -> None:
        trusted = self._trust.classify(source.host) is Trust.SOFTSWITCH
        key: ServerKey | None = None
        if trusted and self._fast:
            key = _rfc3261_key(request)
            if key is not None and self._absorbed(key, request, now):
                return
        request = stamp_received(request, source)
        if not trusted:
            admitted = self._admit_untrusted(request, source, now)
            if admitted is None:
                return
            request = admitted
        method = request.method
        if key is None:
            key = server_key(request)
        server = self._server.get(key)
        if server is not None:
            # A retransmission, or the ACK of a non-2xx: the transaction absorbs it.
            self._run_server(server, server.txn.receive(request, now), now)
            self._retransmitted(server, now)
            return
        if method == "ACK":
            if self._branches.is_local_tag(request.to_tag):
                # The ACK of a final response made here with no transaction left to absorb
                # it (a 503 when shedding load): nothing downstream is waiting for it.
                return
            # ACK for a 2xx is its own transaction and goes end to end (§16.11 / §13.2.2.4).
            self._forward_stateless(request, source)
            return
        if method == "CANCEL":
            self._on_cancel(request, source, key, now)
            return
        if self._refused(request, source):
            return

        reliable = _reliable(source)
        timers = self._options.timers
        txn: ServerTransaction
        if method == "INVITE":
            txn = ServerInviteTransaction(request, reliable=reliable, timers=timers, key=key)
        else:
            txn = ServerNonInviteTransaction(request, reliable=reliable, timers=timers, key=key)
        inbound = self._by_transport.get(source.transport, self._locals[0])
        self._last_id += 1
        context = _Context(self._last_id, txn, source, request, inbound)
        self._created = context
        entry = _ServerEntry(txn, context, response_peer(request.top_via, source))
        context.upstream = entry.peer
        self._server[key] = entry
        self._contexts[context.id] = context

        # The changes every forwarded request gets are collected on one copy of it, made
        # once the route is known (Message.edit).
        try:
            forwarded = decrement_max_forwards(request.edit())
        except TooManyHops:
            if method == "OPTIONS" and self._addressed_to_us(request):
                self._answer_options(context, now)
                return
            self._events.append(RequestRouted(method, Route.REJECTED))
            self._reply(context, make_response(request, 483, to_tag=self._branches.tag()), now)
            return
        routes = self._pop_own_routes(forwarded)
        has_route = routes is not None
        initial = request.to_tag is None
        context.initial = initial
        if initial and forwarded.has("priority"):
            priority = forwarded.get("priority") or ""
            if priority.strip().lower() == "psap-callback":
                # RFC 7090 §6: honoured only on calls from a PSAP, and none comes through
                # here (callbacks reach the CSP from its carrier, not from its softswitch):
                # on anything we relay the marking could only jump a queue it has no right to.
                forwarded.remove("priority")

        if initial and method == "INVITE":
            number = self._options.emergency_classifier(request.request_uri)
            if number is not None:
                if has_route:
                    # The emergency trunks are ours to choose: a route set preloaded past us
                    # would take the call somewhere else.
                    forwarded.remove("route")
                self._begin_emergency(context, forwarded, number, now)
                return
        # Only here is the context known not to be an emergency call's; those that ended
        # before (a 483, an OPTIONS answered here) are forgotten already. An in-dialog
        # request (a BYE above all) finishes a call already admitted, a 911 call's as much
        # as any: evicting one to make room for another freed nothing and refused both
        # callers' hang-ups in turn, so only new work is offered.
        if initial:
            self._evictable.add(context)
        if initial and not has_route:
            if method == "OPTIONS" and self._addressed_to_us(request):
                self._answer_options(context, now)
                return
            context.route = Route.DEFAULT
            held = context._held()  # one call, where each property is one more
            if method in DIALOG_CREATING:
                held.stamp = self._stamp(request, False)
            held.template = forwarded.done()
            held.trunks = self._health.order(self._options.default_trunks)
            self._events.append(RequestRouted(method, Route.DEFAULT))
            if not self._next_trunk(context, now):
                self._reply(context, make_response(request, 503, to_tag=self._branches.tag()), now)
            elif method == "INVITE":
                self._send_trying(context, now)
            return

        target = next_hop(forwarded, routes)
        if not has_route and is_local_uri(target, self._locals):
            # In-dialog request for us, not through us: no dialog of ours to match.
            self._events.append(RequestRouted(method, Route.REJECTED))
            self._reply(context, make_response(request, 481, to_tag=self._branches.tag()), now)
            return
        if initial:
            # An initial request with a preloaded route set follows it (RFC 3261 §16.6),
            # and stays in the dialog it creates.
            context.route = Route.ROUTE_SET
            if method in DIALOG_CREATING:
                context._held().stamp = self._stamp(request, False)
        else:
            context.route = Route.IN_DIALOG
        template = context._held().template = forwarded.done()
        self._events.append(RequestRouted(method, context.route))
        self._start_branch(context, target, template, now, trunk=None)
        if method == "INVITE":
            self._send_trying(context, now)

    def _retransmitted(self, server: _ServerEntry, now: float) -> None:
        """After a retransmitted request reached its transaction: an INVITE whose 100 Trying
        is still held gets it now. The transaction answers a retransmission with its latest
        provisional (RFC 3261 §17.2.1), and there is none yet; the caller must hear from us."""
        context = server.context
        if context is not None and context.trying_deadline is not None:
            self._send_trying(context, now)

    def _send_trying(self, context: _Context, now: float) -> None:
        """The 100 Trying, unless a final response went first (it would only follow it)."""
        context.trying_deadline = None
        if context.state is not ContextState.FINISHED:
            self._server_send(context, make_response(context.request, 100), now)

    def _absorbed(self, key: ServerKey, request: Request, now: float) -> bool:
        """Fast path: a retransmission (or the ACK of a non-2xx final) that its server
        transaction absorbs, handled without stamping or routing it.

        An ACK that the transaction passes up (after a 2xx, RFC 6026 §7.1) is forwarded, so
        it needs the stamped request: it takes the general path.
        """
        server = self._server.get(key)
        if server is None:
            return False
        txn = server.txn
        if request.method == "ACK" and txn.state is TransactionState.ACCEPTED:
            return False
        self._absorbed_fast += 1
        self._run_server(server, txn.receive(request, now), now)
        self._retransmitted(server, now)
        return True

    def _pop_own_routes(self, request: Edit[Request]) -> str | None:
        """:func:`~e911_sip.proxy.routing.pop_own_routes` on ``request`` with our addresses
        (and, on the fast path, our Record-Route values recognised without parsing them)."""
        return pop_own_routes(request, self._locals, self._own_routes)

    def _stamp(self, request: Request, emergency: bool) -> str:
        """The stamp for the Record-Route of the dialog ``request`` creates."""
        return self._branches.dialog_stamp(request.call_id, emergency=emergency)

    def _restore_trunk_dialog(self, request: Request, source: Peer, now: float) -> bool:
        """A trunk sends in a dialog the table does not hold: allowed when its top Route is
        ours with the stamp we wrote for this Call-ID (another worker routed the call, or
        this process before a restart), and then remembered again."""
        routes = request.get("route")
        if routes is None:
            return False
        first = split_values(routes)[0]
        stamp = route_stamp(first)
        if stamp is None:
            return False
        try:
            ours = is_local_uri(parse_uri(parse_name_addr(first).uri), self._locals)
        except SipError:
            return False
        emergency = self._branches.check_dialog_stamp(request.call_id, stamp) if ours else None
        if emergency is None:
            return False
        self._trunk_dialogs.add(request.call_id, source.host, now, emergency=emergency)
        self._events.append(
            Recovered("trunk_dialog", emergency, source, request.call_id, request.method)
        )
        return True

    def _admit_untrusted(self, request: Request, source: Peer, now: float) -> Request | None:
        """What may come from outside the trust domain (RFC 3325 §5), or None when refused.

        A trunk may keep its dialogs alive (in-dialog requests of dialogs it answered, sent to
        the softswitch or a trunk) and ping us with OPTIONS; the identity and location headers
        it sends are removed. Nothing else from outside is relayed, a 911 call included.
        """
        if self._trust.classify(source.host) is not Trust.TRUNK:
            self._refuse(request, source, "untrusted_source")
            return None
        if request.to_tag is None:
            if (
                request.method == "OPTIONS"
                and self._addressed_to_us(request)
                and self._pop_own_routes(request.edit()) is None
            ):
                return request
            self._refuse(request, source, "untrusted_initial")
            return None
        if not self._trunk_dialogs.allows(
            request.call_id, source.host, now
        ) and not self._restore_trunk_dialog(request, source, now):
            self._refuse(request, source, "untrusted_dialog")
            return None
        edit = request.edit()
        target = next_hop(edit, self._pop_own_routes(edit))
        if not self._trust.may_receive(target.host):
            self._refuse(request, source, "untrusted_target")
            return None
        for name in IDENTITY_HEADERS:
            if request.has(name):
                request = request.remove(name)
        return request

    def _refuse(self, request: Request, source: Peer, reason: str) -> None:
        """Drop a request from outside, or answer 403 without a transaction: no state, no
        retransmissions, and the reply goes only to the address it came from."""
        self._events.append(Discarded(reason, request.method, source))
        if self._options.reject_untrusted and request.method != "ACK":
            reply = make_response(request, 403, to_tag=self._branches.tag())
            self._outbox.append(Outgoing(reply.to_bytes(), source))

    # -- admission (overload control) ----------------------------------------------------
    def _refused(self, request: Request, source: Peer) -> bool:
        """Refuse, with a stateless 503, a request that would add state the edge cannot
        afford; make room instead by dropping finished transactions, or any non-emergency
        state when it is an emergency INVITE or a BYE."""
        options = self._options
        transactions = len(self._server) + len(self._client)
        if transactions >= options.max_transactions and self._done.count:
            # A finished transaction only absorbs retransmissions: at the bound, any new
            # request takes the place of the oldest ones rather than being refused.
            evicted = self._evict_finished(options.max_transactions - 4)
            if evicted:
                self._events.append(Evicted(evicted, 0))
            transactions = len(self._server) + len(self._client)
        working = transactions - self._done.count
        load: str | None = None
        if transactions >= options.max_transactions:
            bound: str | None = "transactions_full"
        elif len(self._contexts) >= options.max_contexts:
            bound = "contexts_full"
        else:
            bound = None
            if working < options.shed_transactions:
                load = options.overload()
                if load is None:
                    return False  # the common case: nothing to decide
        method = request.method
        initial = request.to_tag is None
        if method == "BYE" or (
            initial
            and method == "INVITE"
            and options.emergency_classifier(request.request_uri) is not None
        ):
            if bound is not None:
                self._make_room()
            return False
        reason: str | None
        if bound is not None:
            reason = bound
        elif not initial or (method == "OPTIONS" and self._addressed_to_us(request)):
            # In-dialog requests finish calls already admitted; OPTIONS to us is the
            # softswitch asking whether it can send 911 calls here, which it can.
            return False
        elif working >= options.shed_transactions:
            reason = "transactions"
        else:
            reason = load
        self._events.append(Shed(reason or "load", method, source))
        self._send_stateless_reply(self._unavailable(request), source)
        return True

    def _unavailable(self, request: Request) -> Response:
        retry = (("Retry-After", str(self._options.retry_after)),)
        return make_response(request, 503, to_tag=self._branches.tag(), extra=retry)

    def _evict_finished(self, target: int) -> int:
        """Drop finished transactions, oldest first, until at most ``target`` transactions
        are left or none is finished; how many went."""
        done = self._done
        dropped = 0
        while len(self._server) + len(self._client) > target:
            # A finished transaction only absorbs retransmissions: losing it costs at most
            # an answer to a late one, and its context (if still kept) carries on without it.
            finished = done.oldest()
            if finished is None:
                break
            if isinstance(finished, _ServerEntry):
                self._drop_server(finished)
            else:
                self._drop_client(finished)
            self._wheel.cancel(finished.txn)
            dropped += 1
        return dropped

    def _make_room(self) -> None:
        """Evict finished transactions, oldest first, then the oldest non-emergency state,
        until a new call fits under the bounds."""
        options = self._options
        contexts = self._contexts
        evictable = self._evictable
        # Room for the server transaction, one branch, and a CANCEL or a failover.
        target = options.max_transactions - 4
        dropped_transactions = self._evict_finished(target)
        dropped_contexts = 0
        # Working state is evicted a request being proxied at a time, through its context:
        # every working transaction but a CANCEL's or a probe's belongs to one, and the
        # contexts table holds only calls still being set up. Walking the transaction tables
        # instead, oldest first, passed every finished emergency transaction they hold (32 s
        # of them, never evicted): in a sustained 911 flood at the bound, each new call
        # walked 150,000 of them. The oldest non-emergency context is kept apart, so the
        # working emergency calls are not walked either.
        while (
            len(contexts) >= options.max_contexts or len(self._server) + len(self._client) > target
        ):
            victim = evictable.oldest()
            if victim is None:
                break  # everything left is emergency state: the call goes over the bound
            dropped_transactions += self._evict_context(victim)
            dropped_contexts += 1
        if dropped_transactions or dropped_contexts:
            self._events.append(Evicted(dropped_transactions, dropped_contexts))

    def _evict_context(self, context: _Context) -> int:
        """Forget a non-emergency request being proxied: the caller gets a stateless 503 if
        it has no final response yet, a ringing trunk a CANCEL. Returns transactions dropped."""
        dropped = 0
        self._contexts.pop(context.id, None)
        self._evictable.remove(context)
        server = self._server.get(context.server.key)
        if server is not None and server.txn is context.server:
            self._drop_server(server)
            dropped += 1
        self._wheel.cancel(context)
        if context.step(ContextEvent.FINAL) is not None:
            self._send_stateless_reply(self._unavailable(context.request), context.source)
        for branch in context.branches:
            txn = branch.txn
            entry = self._client.get(txn.key)
            if entry is not None and entry.txn is txn:
                self._drop_client(entry)
                dropped += 1
            invite = txn.request
            if (
                isinstance(txn, ClientInviteTransaction)
                and branch.state is BranchState.PROCEEDING
                and invite is not None
            ):
                self._outbox.append(Outgoing(build_cancel(invite).to_bytes(), branch.peer))
            branch.state = BranchState.DONE
            self._wheel.cancel(branch)
        context.branches = ()
        return dropped

    def _addressed_to_us(self, request: Request) -> bool:
        uri = request.request_uri
        return uri.user is None and is_local_uri(uri, self._locals)

    def _answer_options(self, context: _Context, now: float) -> None:
        self._events.append(RequestRouted("OPTIONS", Route.LOCAL))
        if self.draining:
            self._reply(context, self._unavailable(context.request), now)
            return
        extra = [("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS")]
        if self._options.server_header:
            extra.append(("Server", self._options.server_header))
        reply = make_response(context.request, 200, to_tag=self._branches.tag(), extra=extra)
        self._reply(context, reply, now)

    def _begin_emergency(
        self, context: _Context, edit: Edit[Request], number: str, now: float
    ) -> None:
        removed: tuple[str, ...] = ()
        if not self._options.keep_device_geolocation:
            # A location the edge did not write is not passed to the PSAP by default: the
            # provisioned, validated one is the dispatchable location (RFC 6442 §3.2).
            for name in ("geolocation", "geolocation-routing", "geolocation-error"):
                if edit.has(name):
                    if name == "geolocation":
                        removed = tuple(edit.get_all(name))
                    edit.remove(name)
        forwarded = edit.done()
        context.route = Route.EMERGENCY
        context.emergency_number = number
        held = context._held()
        held.trunks = self._health.order(self._options.emergency_trunks)
        held.template = forwarded
        context.step(ContextEvent.AWAIT_OWNER)
        fail_open = now + self._options.fail_open_after
        trying = now + self._options.trying_after
        context.fail_open_deadline = fail_open
        context.trying_deadline = trying
        # One slot on the wheel for both deadlines: the earlier, then the other.
        self._wheel.schedule(
            context, trying if trying < fail_open else fail_open, self._on_context_timer
        )
        self._events.append(RequestRouted("INVITE", Route.EMERGENCY))
        self._events.append(
            EmergencyCall(context.id, forwarded, number, forwarded.call_id, removed)
        )

    def _context_timer(self, context: _Context, now: float) -> None:
        """The deadlines of an emergency call waiting for the owner: fail-open (which sends
        the held 100 Trying too), or the held 100 Trying alone."""
        if context.state is not ContextState.AWAITING_OWNER:
            return
        deadline = context.fail_open_deadline
        if deadline is not None and deadline <= now:
            self._events.append(FailOpen(context.id, context.request.call_id))
            self._start_emergency(context, context.template, now, enriched=False)
            return
        trying = context.trying_deadline
        if trying is not None and trying <= now:
            self._send_trying(context, now)
        if deadline is not None:
            self._wheel.schedule(context, deadline, self._on_context_timer)

    def _start_emergency(
        self, context: _Context, request: Request, now: float, *, enriched: bool
    ) -> None:
        context.fail_open_deadline = None
        self._wheel.cancel(context)
        context.enriched = enriched
        if context.step(ContextEvent.RESUME) is None:
            return
        held = context._held()
        held.template = request
        held.stamp = self._stamp(request, True)
        if not self._next_trunk(context, now):
            # No emergency trunk configured: the config check refuses that, but answer
            # rather than leave a caller waiting if it ever happens.
            self._reply(
                context, make_response(context.request, 503, to_tag=self._branches.tag()), now
            )
        if context.trying_deadline is not None:
            # The held 100 goes after the INVITE (and not at all after that 503).
            self._send_trying(context, now)

    def _next_trunk(self, context: _Context, now: float) -> bool:
        """Send the request to the next trunk in order; False when none is left."""
        held = context._held()  # once: each property read is one more call
        trunks = held.trunks
        if not trunks:
            return False
        trunk = trunks.pop(0)
        uri = self._trunk_uris.get(trunk) or parse_uri(trunk)
        number = context.emergency_number
        ruri: str | None = None
        if number is not None:
            # param_of and uri_hostport: compiled, a Uri's methods are generic calls.
            transport = param_of(uri.params, "transport")
            suffix = f";transport={transport}" if transport else ""
            ruri = f"sip:{number}@{uri_hostport(uri)}{suffix}"
        context.attempt += 1
        if number is not None:
            self._events.append(
                EmergencyForwarded(
                    context.id, held.request.call_id, trunk, context.attempt, context.enriched
                )
            )
        self._start_branch(context, uri, held.template, now, trunk=trunk, ruri=ruri)
        return True

    def _start_branch(
        self,
        context: _Context,
        target: Uri,
        request: Request,
        now: float,
        *,
        trunk: str | None,
        ruri: str | None = None,
    ) -> None:
        """Send ``request`` to ``target`` (with the Request-URI ``ruri``, when given) as a new
        branch: our Via, and the second Record-Route when the transports differ, are added
        in one copy of the request."""
        peer = self._peer_for(target)
        local = self._by_transport.get(peer.transport)
        if local is None:
            # No listener for that transport: use the first we have rather than fail.
            local = self._locals[0]
            peer = Peer(local.transport, peer.host, peer.port)
        edit = request.edit()
        held = context._held()
        stamp = held.stamp
        if stamp is not None:
            # Our Record-Route: two entries when the two sides use different transports
            # (RFC 5658), which only the branch knows.
            add_record_route(edit, context.inbound, local, stamp)
        via_branch = self._branches.new()
        request = add_via(edit, local, via_branch).done(uri=ruri)
        timers = self._options.timers
        txn: ClientTransaction
        if request.method == "INVITE":
            txn = ClientInviteTransaction(
                request, reliable=_reliable(peer), timers=timers, branch=via_branch
            )
        else:
            txn = ClientNonInviteTransaction(
                request, reliable=_reliable(peer), timers=timers, branch=via_branch
            )
        branch = _Branch(context, txn, peer, trunk or f"sip:{uri_hostport(target)}")
        context.branches = (*context.branches, branch)
        entry = _ClientEntry(txn, branch, peer)
        entry.upstream_via = held.request.top_via.raw
        self._client[txn.key] = entry
        if request.method == "INVITE" and trunk is not None and held.trunks:
            branch.provisional_deadline = now + self._options.provisional_timeout
            self._arm_branch(branch)
        self._run_client(entry, txn.start(now), now)

    def _peer_for(self, target: Uri) -> Peer:
        """``peer_for_uri(target)``, remembered: requests go to a few targets again and again
        (trunks, the softswitch), and each reading builds a Peer from the URI's parameters.

        Raises:
            UnsupportedUriScheme: as peer_for_uri (nothing is remembered then).
        """
        peer = self._peers.get(target)
        if peer is None:
            peer = peer_for_uri(target)
            if len(self._peers) >= _PEERS_SIZE:
                self._peers.clear()  # bounded: in-dialog targets are the callers' addresses
            self._peers[target] = peer
        return peer

    def _on_cancel(
        self, request: Request, source: Peer, key: tuple[str, str, str], now: float
    ) -> None:
        invite = self._server.get(server_key(request, "INVITE"))
        context = invite.context if invite is not None else None
        if context is None:
            # §16.10: no response context; forward it statelessly along its own route.
            self._events.append(RequestRouted("CANCEL", Route.STATELESS))
            self._forward_stateless(request, source)
            return
        txn = ServerNonInviteTransaction(
            request, reliable=_reliable(source), timers=self._options.timers, key=key
        )
        entry = _ServerEntry(txn, None, response_peer(request.top_via, source))
        self._server[key] = entry
        ok = make_response(request, 200, to_tag=self._branches.tag())
        self._run_server(entry, txn.send_response(ok, now), now)
        self._events.append(RequestRouted("CANCEL", Route.IN_DIALOG))
        was = context.state
        if context.step(ContextEvent.CANCEL) is None:
            return
        if was is ContextState.AWAITING_OWNER or not any(
            b.state in _COUNTING for b in context.branches
        ):
            self._wheel.cancel(context)
            self._final(
                context, make_response(context.request, 487, to_tag=self._branches.tag()), now
            )
            return
        for branch in context.branches:
            self._cancel_branch(branch, now)

    def _cancel_branch(self, branch: _Branch, now: float) -> None:
        if not isinstance(branch.txn, ClientInviteTransaction):
            return
        if branch.step(BranchEvent.CANCEL) is not BranchState.CANCELLING:
            return  # §9.1: without a provisional the CANCEL waits for one; else it went
        self._send_cancel(branch, now)

    def _send_cancel(self, branch: _Branch, now: float) -> None:
        invite = branch.txn.request
        # The INVITE is only let go of once a final response came, and then there is no
        # CANCEL to send (§9.1); the timer is armed all the same, so the branch ends.
        if invite is not None:
            txn = ClientNonInviteTransaction(
                build_cancel(invite),
                reliable=_reliable(branch.peer),
                timers=self._options.timers,
                branch=branch.txn.key[0],  # a CANCEL has its INVITE's branch (§9.1)
            )
            entry = _ClientEntry(txn, None, branch.peer)
            self._client[txn.key] = entry
            self._run_client(entry, txn.start(now), now)
        branch.timer_c_deadline = now + self._options.timers.timer_b
        self._arm_branch(branch)

    def _forward_stateless(self, request: Request, source: Peer) -> None:
        """Forward without a transaction: ACK for 2xx, CANCEL without a context (§16.11)."""
        # Every change is made on one copy of the request, written out once.
        try:
            forwarded = decrement_max_forwards(request.edit())
        except TooManyHops:
            self._events.append(Discarded("too_many_hops", request.method, source))
            return
        routes = self._pop_own_routes(forwarded)
        if request.method == "CANCEL" and routes is None:
            # A CANCEL for a request we never saw: nothing downstream can match it either.
            self._events.append(Discarded("no_transaction", "CANCEL", source))
            return
        target = next_hop(forwarded, routes)
        if routes is None and is_local_uri(target, self._locals):
            self._events.append(Discarded("no_route", request.method, source))
            return
        peer = self._peer_for(target)
        local = self._by_transport.get(peer.transport, self._locals[0])
        if local.transport != peer.transport:
            peer = Peer(local.transport, peer.host, peer.port)
        branch = self._branches.stateless(request)
        add_via(forwarded, local, branch, answered=request.method != "ACK")
        self._events.append(RequestRouted(request.method, Route.STATELESS))
        self._outbox.append(Outgoing(forwarded.done().to_bytes(), peer))

    def _send_stateless_reply(self, response: Response, source: Peer) -> None:
        try:
            peer = response_peer(response.top_via, source)
        except SipError:
            return
        self._outbox.append(Outgoing(response.to_bytes(), peer))

    # -- responses -----------------------------------------------------------------------
    def _on_response(self, response: Response, source: Peer, now: float) -> None:
        entry = self._client.get(client_key(response))
        if entry is None:
            if not self._relay_late_2xx(response, source):
                self._events.append(Discarded("stray_response", str(response.status), source))
            return
        peer = entry.peer
        if (
            source.host != peer.host
            or source.port != peer.port
            or source.transport != peer.transport
        ) and is_ip_address(peer.host):
            # §17.1.3 matches by branch; the branch is unguessable, and on top of that only
            # the hop the request went to may answer it (a forged 503 must not end a call).
            # A target named by host name was resolved by the transport, so its address is
            # not known here; trunks are configured by IP, so the emergency path is checked.
            self._events.append(Discarded("response_source", str(response.status), source))
            return
        relayed: Response | None = None
        if entry.branch is not None and self._fast and entry.upstream_via:
            # The common case checked and cut at once: the Vias received as ``<ours>,
            # <upstream's>`` give the response to relay, our Via cut from the bytes.
            relayed = response.pop_top_via_before(entry.upstream_via)
        if (
            entry.branch is not None
            and relayed is None
            and not (self._fast and _below_top_via(response, entry.upstream_via))
        ):
            vias = response.values("via")
            if len(vias) < 2:
                # §16.7 step 3: with our Via popped nothing would be left to route it upstream.
                self._events.append(Discarded("malformed", "response with only our Via", source))
                return
            second = vias[1]
            if not (self._fast and second == entry.upstream_via):
                parse_via(second)  # raises MalformedMessage: upstream could not match it either
        txn = entry.txn
        effects = txn.receive(response, now)
        branch = entry.branch
        if self._fast and branch is not None and len(effects) == 1 and type(effects[0]) is PassUp:
            # Fast path: a provisional or a 2xx for one of our branches, the common response.
            try:
                self._branch_response(branch, response, now, relayed)
            finally:
                self._arm_client(entry)
            return
        self._run_client(entry, effects, now)

    def _relay_late_2xx(self, response: Response, source: Peer) -> bool:
        """Relay upstream, without a transaction, a 2xx to an INVITE that a branch of ours
        sent and that no transaction here holds; True when it went.

        The process that sent the INVITE died (a worker killed while a 911 call rang), or the
        2xx is a retransmission after Timer M. The callee has answered: dropping the 2xx
        would lose a call that is up, so it goes the way RFC 3261 §16.7 first asked of every
        stray response. Only what cannot be forged or misdirected goes: from a trunk or the
        softswitch, with our Via on top whose branch carries our key's digest, to a Via below
        it that names the softswitch or a trunk by its stamped address. RFC 6026 dropped the
        stateless relay for a proxy that holds its transactions; this is the one case where
        it no longer does.
        """
        status = response.status
        if status < 200 or status >= 300 or self._trust.classify(source.host) is Trust.OUTSIDER:
            return False
        try:
            if response.cseq_method != "INVITE":
                return False
            vias = response.values("via")
            if len(vias) < 2:
                return False
            ours = parse_via(vias[0])
            upstream = parse_via(vias[1])
        except SipError:
            return False
        if not self._branches.is_local_branch(ours.branch) or not any(
            ours.host == local.host and ours.port == local.port for local in self._locals
        ):
            return False
        if upstream.param("rport") == "":
            return False  # not stamped by us on the way in: no address we vouched for
        peer = response_peer(upstream, Peer(upstream.transport.lower(), source.host, source.port))
        if not self._trust.may_receive(peer.host) or peer.transport not in self._by_transport:
            return False
        if any(peer.host == local.host and peer.port == local.port for local in self._locals):
            return False  # to ourselves: a replayed stack of our own Vias, not a caller
        emergency = False
        for value in response.values("record-route"):
            stamp = route_stamp(value)
            if stamp is not None:
                emergency = self._branches.check_dialog_stamp(response.call_id, stamp) is True
                break
        self._events.append(Recovered("late_2xx", emergency, source, response.call_id, "INVITE"))
        self._outbox.append(Outgoing(response.pop_top_via().to_bytes(), peer))
        return True

    def _branch_response(
        self, branch: _Branch, response: Response, now: float, relayed: Response | None = None
    ) -> None:
        """A response of ``branch`` passed up by its transaction; ``relayed`` is what goes
        upstream of it (``response.pop_top_via()``) when already made."""
        context = branch.context
        status = response.status
        if status > 100 and status < 300 and not branch.dialog_noted:
            self._note_trunk_dialog(branch, response, now)
        was = branch.state
        if was in _NO_PROVISIONAL_YET:
            self._call_outcome(branch, True, "ok" if status < 300 else str(status), now)
        if status < 200:
            nxt = branch.step(BranchEvent.PROVISIONAL)
            if nxt is None or was is BranchState.ABANDONED_CANCELLING:
                return
            branch.provisional_deadline = None
            if nxt is not was and nxt in _CANCEL_SENT:
                # A CANCEL waited for this provisional (§9.1), or the branch was abandoned.
                self._send_cancel(branch, now)
                return
            branch.timer_c_deadline = now + self._options.timer_c
            self._arm_branch(branch)
            if status != 100 and context.state in _OPEN:
                self._reply(context, relayed or response.pop_top_via(), now)
            return
        if branch.step(BranchEvent.SUCCESS if status < 300 else BranchEvent.FAILURE) is None:
            return
        branch.provisional_deadline = None
        branch.timer_c_deadline = None
        self._wheel.cancel(branch)
        if status < 300:
            # Every 2xx goes upstream (§16.7 step 5), even a late one from an abandoned trunk.
            if context.step(ContextEvent.FINAL) is not None:
                self._completed(context, status, branch.trunk)
            self._server_send(context, relayed or response.pop_top_via(), now)
            for other in context.branches:
                if other is not branch:
                    self._cancel_branch(other, now)
            self._maybe_forget(context)
            return
        if was is BranchState.ABANDONED or was is BranchState.ABANDONED_CANCELLING:
            self._maybe_finish(context, now)
            return
        context.responses.append(relayed or response.pop_top_via())
        if (
            status == 424
            and context.route is Route.EMERGENCY
            and context.template.has("geolocation")
            and context.state in _OPEN
        ):
            # RFC 6442 §4.3: the trunk could not use the location we inserted. The call must
            # still go through: the same trunk again, this time without our location (RFC 6881
            # §6.5 prefers a call without location to no call), and no 424 goes upstream.
            context.template = context.template.remove("geolocation").remove("geolocation-routing")
            context.enriched = False
            context.trunks.insert(0, branch.trunk)
            self._fail_over(context, branch, "424", now)
            return
        if self._can_fail_over(context) and _is_failover_status(status):
            self._fail_over(context, branch, str(status), now)
            return
        self._maybe_finish(context, now)

    def _note_trunk_dialog(self, branch: _Branch, response: Response, now: float) -> None:
        """A trunk answered a dialog-creating request: it may now send in that dialog."""
        branch.dialog_noted = True
        # The context's request, not the branch's: the transaction let go of its request
        # when this response finished it. Both carry the same Call-ID.
        if branch.txn.method not in DIALOG_CREATING:
            return
        if self._trust.classify(branch.peer.host) is not Trust.TRUNK:
            return
        try:
            tag = response.to_tag
        except SipError:
            return  # an unreadable To: no dialog the trunk could send in (found by fuzzing)
        if tag is not None:
            self._trunk_dialogs.add(
                branch.context.request.call_id,
                branch.peer.host,
                now,
                emergency=branch.context.route is Route.EMERGENCY,
            )

    def _branch_failed(
        self,
        branch: _Branch,
        reason: str,
        now: float,
        event: BranchEvent = BranchEvent.FAILED,
    ) -> None:
        """A branch ended with no final response: it counts as a 408 (§16.7 step 1, §16.8)."""
        was = branch.state
        if branch.step(event) is not BranchState.DONE:
            return
        if was is BranchState.CALLING or was is BranchState.CANCEL_PENDING:
            self._call_outcome(branch, False, reason, now)
        branch.provisional_deadline = None
        branch.timer_c_deadline = None
        self._wheel.cancel(branch)
        context = branch.context
        if was is BranchState.ABANDONED or was is BranchState.ABANDONED_CANCELLING:
            self._maybe_finish(context, now)
            return
        context.responses.append(make_response(context.request, 408, to_tag=self._branches.tag()))
        if self._can_fail_over(context):
            self._fail_over(context, branch, reason, now)
            return
        self._maybe_finish(context, now)

    def _can_fail_over(self, context: _Context) -> bool:
        return (
            context.route in (Route.EMERGENCY, Route.DEFAULT)
            and bool(context.trunks)
            and context.state in _OPEN
        )

    def _fail_over(self, context: _Context, branch: _Branch, reason: str, now: float) -> None:
        self._events.append(
            Failover(
                context.request.call_id, context.route is Route.EMERGENCY, branch.trunk, reason
            )
        )
        self._next_trunk(context, now)

    def _maybe_finish(self, context: _Context, now: float) -> None:
        """Send the best final response once no branch can produce a better one."""
        if context.state is ContextState.FINISHED:
            self._maybe_forget(context)
            return
        if any(b.state in _COUNTING for b in context.branches):
            return
        if context.state is ContextState.CANCELLED:
            best = make_response(context.request, 487, to_tag=self._branches.tag())
        elif context.responses:
            best = min(context.responses, key=_response_rank)
            if best.status == 503 or (best.status == 424 and context.route is Route.EMERGENCY):
                # §16.7 step 6 for 503; a 424 about a location the edge inserted is the edge's
                # own failure, not the caller's (RFC 6442 §4.3).
                best = make_response(context.request, 500, to_tag=self._branches.tag())
        else:
            best = make_response(context.request, 408, to_tag=self._branches.tag())
        self._final(context, best, now)

    def _final(self, context: _Context, response: Response, now: float) -> None:
        if context.step(ContextEvent.FINAL) is None:
            return
        trunk = context.branches[-1].trunk if context.branches else None
        self._completed(context, response.status, trunk)
        self._server_send(context, response, now)
        self._maybe_forget(context)

    def _completed(self, context: _Context, status: int, trunk: str | None) -> None:
        request = context.request
        initial = context.initial
        if initial is None:
            try:
                initial = request.to_tag is None
            except SipError:
                initial = False  # an unreadable To: answered 400, and no dialog came of it
        if (status >= 300 and initial) or (status < 300 and request.method == "BYE"):
            # The dialog never came up, or it is over: the trunk may send nothing more in it.
            self._trunk_dialogs.end(request.call_id)
        # Initial requests are reported; so is BYE, which ends a dialog the owner may track.
        if context.route in _REPORTED or request.method == "BYE":
            self._events.append(
                CallCompleted(
                    request.call_id,
                    request.method,
                    context.route is Route.EMERGENCY,
                    status,
                    trunk,
                )
            )

    def _maybe_forget(self, context: _Context) -> None:
        # A context lives while one of its branches may still need a CANCEL or bring a 2xx.
        if context.state is not ContextState.FINISHED:
            return
        for branch in context.branches:
            if branch.state is not BranchState.DONE:
                return
        contexts = self._contexts
        if contexts.get(context.id) is not context:
            return  # forgotten before
        del contexts[context.id]  # get and del: compiled, dict.pop is a generic call
        self._evictable.remove(context)
        # Branches point back at their context; dropping the forward list breaks the cycle
        # so the context is freed by reference counting, not by a GC pass.
        context.branches = ()
        # What lingers (the server transaction in Accepted, a branch's client transaction
        # forwarding 2xx retransmissions) reads none of these again.
        context.held = None

    def _reply(self, context: _Context, response: Response, now: float) -> None:
        """A response of our own making (100, 483, 503, ...) or a provisional going upstream."""
        if response.status >= 200:
            if context.step(ContextEvent.FINAL) is None:
                return
            self._completed(context, response.status, None)
        self._server_send(context, response, now)
        self._maybe_forget(context)

    def _server_send(self, context: _Context, response: Response, now: float) -> None:
        entry = self._server.get(context.server.key)
        if entry is None or entry.txn is not context.server:
            # The server transaction has ended (its Timer L ran out); a late 2xx still goes.
            peer = context.upstream
            if 200 <= response.status < 300 and peer is not None:
                self._outbox.append(Outgoing(response.to_bytes(), peer))
            return
        try:
            effects = entry.txn.send_response(response, now)
        except TransactionStateError:
            # A 2xx after a non-2xx final (a trunk answering a cancelled call): nothing upstream
            # can take it any more.
            self._events.append(Discarded("late_response", str(response.status), context.source))
            return
        if self._fast and len(effects) == 1 and type(effects[0]) is Transmit:
            # Fast path: the response goes out once, the usual case.
            self._outbox.append(Outgoing(response.to_bytes(), entry.peer))
            self._arm_server(entry)
            return
        self._run_server(entry, effects, now)

    # -- timers and transaction effects --------------------------------------------------
    def _arm_branch(self, branch: _Branch) -> None:
        """Put the branch on the wheel for the earlier of its two deadlines, if any."""
        deadline = branch.provisional_deadline
        timer_c = branch.timer_c_deadline
        if deadline is None or (timer_c is not None and timer_c < deadline):
            deadline = timer_c
        if deadline is None:
            self._wheel.cancel(branch)
        else:
            self._wheel.schedule(branch, deadline, self._on_branch_timer)

    def _branch_timer(self, branch: _Branch, now: float) -> None:
        state = branch.state
        if state is BranchState.DONE:
            return
        deadline = branch.provisional_deadline
        if deadline is not None and deadline <= now:
            branch.provisional_deadline = None
            context = branch.context
            if state in _NO_PROVISIONAL_YET and self._can_fail_over(context):
                self._call_outcome(branch, False, "no_provisional", now)
                branch.step(BranchEvent.NO_PROVISIONAL)
                self._fail_over(context, branch, "no_provisional", now)
        else:
            deadline = branch.timer_c_deadline
            if deadline is not None and deadline <= now:
                branch.timer_c_deadline = None
                if state in _CANCEL_SENT:
                    # §9.1: no final response 64*T1 after the CANCEL: the INVITE transaction
                    # is given up, or it and its context would wait for ever on a silent
                    # trunk.
                    txn = branch.txn
                    entry = self._client.get(txn.key)
                    if entry is not None and entry.txn is txn:
                        self._drop_client(entry)
                    self._wheel.cancel(txn)
                    self._branch_failed(branch, "timeout", now, BranchEvent.TIMER_C)
                    self._maybe_forget(branch.context)
                    return
                if isinstance(branch.txn, ClientInviteTransaction):
                    # §16.8: Timer C fired after a provisional: the branch is cancelled.
                    if branch.step(BranchEvent.TIMER_C) is BranchState.CANCELLING:
                        self._send_cancel(branch, now)
                        return
        if branch.state is not BranchState.DONE:
            self._arm_branch(branch)

    def _client_timer(self, txn: ClientTransaction, now: float) -> None:
        entry = self._client.get(txn.key)
        if entry is None or entry.txn is not txn:
            return
        due = txn.get_timer()
        if due is None:
            return
        if due > now:
            self._wheel.schedule(txn, due, self._on_client_timer)
            return
        self._run_client(entry, txn.handle_timer(now), now)

    def _server_timer(self, txn: ServerTransaction, now: float) -> None:
        entry = self._server.get(txn.key)
        if entry is None or entry.txn is not txn:
            return
        due = txn.get_timer()
        if due is None:
            return
        if due > now:
            self._wheel.schedule(txn, due, self._on_server_timer)
            return
        self._run_server(entry, txn.handle_timer(now), now)

    def _run_client(self, entry: _ClientEntry, effects: Iterable[object], now: float) -> None:
        if entry.probe is not None:
            self._run_probe(entry, entry.probe, effects, now)
            return
        try:
            self._client_effects(entry, effects, now)
        finally:
            # Whatever handling an effect raised, the transaction keeps its timer: one
            # without a timer would never end.
            self._arm_client(entry)

    def _arm_client(self, entry: _ClientEntry) -> None:
        """Put the transaction on the wheel for its next deadline; count it as finished once
        its final response came (it is then only absorbing retransmissions)."""
        txn = entry.txn
        due = txn.get_timer()
        if due is None:
            self._wheel.cancel(txn)
        else:
            self._wheel.schedule(txn, due, self._on_client_timer)
        # Only ever called on an entry in its table: every caller found it there, and a
        # transaction leaves the table only once terminated (not finished any more).
        if not entry.done and txn.finished:
            branch = entry.branch
            if branch is not None and branch.context.route is Route.EMERGENCY:
                self._done.hold(entry)
            else:
                self._done.add(entry)

    def _arm_server(self, entry: _ServerEntry) -> None:
        """As :meth:`_arm_client`: finished once its final response went."""
        txn = entry.txn
        due = txn.get_timer()
        if due is None:
            self._wheel.cancel(txn)
        else:
            self._wheel.schedule(txn, due, self._on_server_timer)
        if not entry.done and txn.finished:
            context = entry.context
            if context is not None and context.route is Route.EMERGENCY:
                self._done.hold(entry)
            else:
                self._done.add(entry)

    def _drop_client(self, entry: _ClientEntry) -> None:
        """Take ``entry`` out of the client table (if it is still there) and the count."""
        key = entry.txn.key
        if self._client.get(key) is entry:
            del self._client[key]
        self._done.remove(entry)

    def _drop_server(self, entry: _ServerEntry) -> None:
        """Take ``entry`` out of the server table (if it is still there) and the count."""
        key = entry.txn.key
        if self._server.get(key) is entry:
            del self._server[key]
        self._done.remove(entry)

    def _client_effects(self, entry: _ClientEntry, effects: Iterable[object], now: float) -> None:
        txn = entry.txn
        branch = entry.branch
        for effect in effects:
            if isinstance(effect, Transmit):
                self._outbox.append(Outgoing(effect.message.to_bytes(), entry.peer, txn.key[0]))
            elif isinstance(effect, PassUp):
                if branch is not None and isinstance(effect.message, Response):
                    self._branch_response(branch, effect.message, now)
            elif isinstance(effect, Timeout):
                if branch is not None:
                    self._branch_failed(branch, "timeout", now)
            elif isinstance(effect, TransportFailure):
                if branch is not None:
                    self._branch_failed(branch, "transport", now)
            elif isinstance(effect, Terminated):
                self._drop_client(entry)
                if branch is not None:
                    self._branch_failed(branch, "timeout", now)
                    self._maybe_forget(branch.context)

    def _run_server(self, entry: _ServerEntry, effects: Iterable[object], now: float) -> None:
        try:
            self._server_effects(entry, effects, now)
        finally:
            self._arm_server(entry)  # as for client transactions: never lose the timer

    def _server_effects(self, entry: _ServerEntry, effects: Iterable[object], now: float) -> None:
        for effect in effects:
            if isinstance(effect, Transmit):
                self._outbox.append(Outgoing(effect.message.to_bytes(), entry.peer))
            elif isinstance(effect, PassUp):
                # An ACK for a 2xx that reused the INVITE's branch (RFC 6026 §7.1).
                message = effect.message
                if isinstance(message, Request) and entry.context is not None:
                    self._forward_stateless(message, entry.context.source)
            elif isinstance(effect, Terminated):
                self._drop_server(entry)
                context = entry.context
                if context is not None and context.step(ContextEvent.SERVER_GONE) is not None:
                    # Only a transport failure ends a server transaction before its final.
                    for branch in context.branches:
                        self._cancel_branch(branch, now)
                if context is not None:
                    self._maybe_forget(context)

    # -- trunk probes --------------------------------------------------------------------
    def _arm_probe_timer(self) -> None:
        due = self._health.next_probe()
        if due is not None:
            self._wheel.schedule(self._probe_slot, due, self._on_probe_timer)

    def _probe_timer(self, _slot: object, now: float) -> None:
        for trunk in self._health.due(now):
            self._send_probe(trunk, now)
        self._arm_probe_timer()

    def _send_probe(self, trunk: str, now: float) -> None:
        uri = self._trunk_uris[trunk]
        peer = peer_for_uri(uri)
        local = self._by_transport.get(peer.transport)
        if local is None:
            local = self._locals[0]
            peer = Peer(local.transport, peer.host, peer.port)
        branch = self._branches.new()
        request = build_probe(
            uri,
            local,
            branch=branch,
            tag=self._tokens.token(),
            user_agent=self._options.server_header,
        )
        txn = ClientNonInviteTransaction(
            request, reliable=_reliable(peer), timers=self._options.timers, branch=branch
        )
        probe = _Probe(trunk, txn.key, now + self._health.probe_timeout(trunk))
        entry = _ClientEntry(txn, None, peer, probe)
        self._client[txn.key] = entry
        self._wheel.schedule(probe, probe.deadline, self._on_probe_deadline)
        self._run_probe(entry, probe, txn.start(now), now)

    def _run_probe(
        self, entry: _ClientEntry, probe: _Probe, effects: Iterable[object], now: float
    ) -> None:
        txn = entry.txn
        for effect in effects:
            if isinstance(effect, Transmit):
                self._outbox.append(Outgoing(effect.message.to_bytes(), entry.peer, txn.key[0]))
            elif isinstance(effect, PassUp):
                message = effect.message
                if isinstance(message, Response) and message.status >= 200:
                    status = message.status
                    if self._health.is_failure_status(probe.trunk, status):
                        self._probe_result(probe, False, str(status), now)
                    else:
                        self._probe_result(probe, True, "ok", now)
            elif isinstance(effect, Timeout):
                self._probe_result(probe, False, "timeout", now)
            elif isinstance(effect, TransportFailure):
                self._probe_result(probe, False, "transport", now)
            elif isinstance(effect, Terminated):
                self._drop_client(entry)
                self._probe_result(probe, False, "timeout", now)
        self._arm_client(entry)

    def _probe_deadline(self, probe: _Probe, now: float) -> None:
        if probe.done or probe.deadline > now:
            return
        # The probe timeout is shorter than Timer F: the transaction is abandoned, and a late
        # response finds no transaction (it is dropped as a stray of ours).
        entry = self._client.get(probe.key)
        if entry is not None and entry.probe is probe:
            self._drop_client(entry)
        self._probe_result(probe, False, "timeout", now)

    def _probe_result(self, probe: _Probe, ok: bool, result: str, now: float) -> None:
        if probe.done:
            return
        probe.done = True
        self._wheel.cancel(probe)
        self._events.append(TrunkProbed(probe.trunk, ok, result))
        change = self._health.record(probe.trunk, ok, result, now, probe=True)
        if change is not None:
            self._events.append(TrunkStateChanged(change.trunk, change.up, change.reason))
        self._arm_probe_timer()

    def _call_outcome(self, branch: _Branch, ok: bool, reason: str, now: float) -> None:
        """A call's first outcome on a configured trunk counts toward that trunk's health."""
        if branch.context.route not in (Route.EMERGENCY, Route.DEFAULT):
            return
        change = self._health.record(branch.trunk, ok, reason, now, probe=False)
        if change is not None:
            self._events.append(TrunkStateChanged(change.trunk, change.up, change.reason))
