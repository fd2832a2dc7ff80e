"""The relay: delivery threads that take queued mail to other hosts.

Read this module beside RFC 5321 §5 (address resolution) and §4.5.4
(retries). ``outqueue.py`` keeps the messages; this module decides where
each recipient's mail goes, speaks SMTP to that host with the standard
library's ``smtplib``, and writes every recipient's outcome back::

    due message --> recipients by domain --> route --> SMTP transaction --> record()
                                              |                              |
                        smarthost, or MX hosts by preference,          250: delivered
                        or the domain itself (implicit MX)             4xx, no answer: retry later
                                                                       5xx: failed --> bounce

Routing (RFC 5321 §5.1). With ``relay.smarthost`` every message goes to that
one host. Otherwise the domain's MX records are tried in order of
preference (equal preferences in random order, to share the load); a host
that cannot be reached, that refuses us before MAIL, or that refuses MAIL
for now (4xx), makes us try the next one. A domain without MX records is
its own mail host (the "implicit MX": its A/AAAA records). A single MX
record "." is a null MX (RFC 7505): the domain takes no mail, and the
recipient fails at once (5.1.10), as it does for a domain that does not
exist (5.1.2). A recipient in one of our own domains is delivered locally,
through the aliases.

Outcomes are per recipient (§3.3): one RCPT may get 250 and the next
550 in the same transaction, and each is honoured. A 4xx reply, or losing
the connection, leaves the recipient pending for the queue's next retry;
a 5xx reply fails it.

TLS. When a host offers STARTTLS (RFC 3207) we use it, without checking
its certificate (opportunistic TLS, RFC 7435; see ``tls.client_context``).
If STARTTLS then fails, refused or broken off in the handshake, the mail
goes in plaintext on a new connection, as it would to a host that offers
no TLS at all, and a warning is logged. A smarthost can be made to require
TLS, and to verify its certificate (``relay.smarthost_tls``): then a failed
STARTTLS is a failed attempt, retried later. Its AUTH password (RFC 4954)
is sent only over TLS, and unless told otherwise only to a smarthost whose
certificate was verified.

Extensions. The MAIL command asks for what the message needs: BODY=8BITMIME
for 8-bit text (RFC 6152), SMTPUTF8 for a UTF-8 address or header (RFC
6531). A host that does not offer it is not sent what needs it: the
recipients concerned fail (5.6.3, 5.6.7 or 5.6.9), as both RFCs allow; we do
not rewrite messages into 7 bits.

Failures go back to the sender as one RFC 3464 bounce per attempt
(``dsn.py``), sent from the null reverse-path. A message whose own
reverse-path is null is never bounced (RFC 5321 §6.1 forbids it: such a
message is itself a notification, §4.5.5, and bouncing it could loop); a
message that has passed through more than ``relay.max_hops`` servers
(counted by its Received: fields, §6.3) is failed, not relayed, as a mail
loop.

Threads: ``relay.workers`` threads each claim one due message at a time, so
at most that many connections go out at once. An enqueue wakes them; so
does a periodic look into the queue directory, which is how a ``pymailsrv
queue flush`` from another process is noticed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import random
import re
import smtplib
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from pymailsrv.config import ConfigError, parse_host_port
from pymailsrv.dsn import build_bounce
from pymailsrv.durable import UnusableFile
from pymailsrv.limits import SMTP_CLIENT_DATA_TIMEOUT_SECONDS, SMTP_CLIENT_REPLY_KEPT, SMTP_CLIENT_REPLY_MAX
from pymailsrv.outqueue import ENHANCED_STATUS, Outcome, QueueEntry, State
from pymailsrv.paths import canonical_domain, in_domains, unquoted_local_part
from pymailsrv.replies import counted, elided
from pymailsrv.storage import StorageError
from pymailsrv.tls import client_context
from pymailsrv.trace import escape_controls

if TYPE_CHECKING:
    import dns.exception
    import dns.name
    import dns.resolver

    from pymailsrv.server import ServerContext

log = logging.getLogger("pymailsrv.relay")

# RFC 3463 statuses for what we find out ourselves, with no reply to quote.
STATUS_DELIVERED = "2.0.0"
STATUS_NO_SUCH_USER = "5.1.1"  # X.1.1 bad destination mailbox address
STATUS_NO_SUCH_DOMAIN = "5.1.2"  # X.1.2 bad destination system address
STATUS_NULL_MX = "5.1.10"  # RFC 7505: X.1.10 "Recipient address has null MX"
STATUS_LOCAL_ERROR = "4.3.0"  # X.3.0 other or undefined mail system status
STATUS_MESSAGE_LOST = "5.3.0"  # the same, for good: the queued message file is gone
STATUS_NO_ANSWER = "4.4.1"  # X.4.1 no answer from host
STATUS_BAD_CONNECTION = "4.4.2"  # X.4.2 bad connection
STATUS_DNS_FAILURE = "4.4.3"  # X.4.3 directory server failure
# X.4.6 routing loop detected: RFC 3463 §3.5 calls it "useful only as a
# persistent transient error", but a loop does not mend itself; Postfix
# also fails a message that loops back to it with 5.4.6.
STATUS_LOOP = "5.4.6"
STATUS_TOO_MANY_RECIPIENTS = "4.5.3"  # X.5.3 too many recipients (RFC 5321 §4.5.3.1.10)
STATUS_NEEDS_8BITMIME = "5.6.3"  # X.6.3 conversion required but not supported (8-bit text, RFC 6152)
STATUS_NEEDS_SMTPUTF8 = "5.6.7"  # RFC 6531 §3.5: non-ASCII address, server without SMTPUTF8
STATUS_UTF8_HEADER = "5.6.9"  # RFC 6531 §3.5: UTF-8 header, server without SMTPUTF8
STATUS_SECURITY = "4.7.0"  # X.7.0 other security status (TLS or AUTH at the smarthost)

# RFC 3464 §2.3.6: a diagnostic that is not an SMTP reply names its own type.
DIAGNOSTIC_TYPE = "X-pymailsrv"

# How long stop() waits for a delivery in progress. One that takes longer
# is cut off when the process ends; its recipients are still pending in the
# queue and are tried again on the next start (RFC 5321 §6.1 accepts the
# rare duplicate this can cause, never a loss).
STOP_WAIT_SECONDS = 5.0

_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)
_RETURN_PATH = re.compile(rb"\Areturn-path:[^\n]*\n(?:[ \t][^\n]*\n)*", re.IGNORECASE)


class RouteError(Exception):
    """No host to try for a domain; ``outcome`` says whether to retry."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.diagnostic)
        self.outcome = outcome


class HopFailed(Exception):
    """This host would not take part in a transaction (before MAIL, or a
    temporary refusal of MAIL itself): try the next one."""

    def __init__(self, hop: "Hop", status: str, diagnostic: str) -> None:
        super().__init__(diagnostic)
        self.outcome = Outcome(State.PENDING, status, diagnostic, hop.name)


class StartTlsFailed(HopFailed):
    """The host offered STARTTLS, but refused it or the TLS handshake failed."""


@dataclass(frozen=True)
class Hop:
    """One place to try: a mail host's name, one of its addresses, and the port."""

    name: str
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.name}[{self.address}]:{self.port}"

    @property
    def server_name(self) -> str:
        """The name TLS asks for (see _HopClient): the host's name, or for an
        address literal (``[192.0.2.1]``) the bare address, for which Python
        sends no SNI: RFC 6066 §3 allows no literal there."""
        return self.address if self.name.startswith("[") else self.name


def _local_diagnostic(text: str) -> str:
    return f"{DIAGNOSTIC_TYPE}; {text}"


def _message_file_failure(error: OSError) -> Outcome:
    """A queued message whose file cannot be read. Accepted mail is
    delivered or reported (RFC 5321 §6.1): a file gone is a failure, bounced;
    one unreadable now (EIO, its permissions) is a failed attempt, so the
    backoff and the queue lifetime apply, and the sender hears at its end."""
    if isinstance(error, FileNotFoundError):
        return Outcome(State.FAILED, STATUS_MESSAGE_LOST, _local_diagnostic("the message file is gone from the queue"))
    return Outcome(State.PENDING, STATUS_LOCAL_ERROR,
                   _local_diagnostic(f"cannot read the message file: {error.strerror or error}"))


def is_positive(code: int) -> bool:
    """RFC 5321 §4.2.1: the first digit decides; 2yz is a positive completion, whatever yz."""
    return 200 <= code <= 299


def outcome_of_reply(code: int, reply: bytes | str, hop: Hop, *, to_text: bool = False) -> Outcome:
    """An SMTP reply as an outcome: 5xx failed, anything else retried; a 2xx
    is a delivery only as the reply to the message text (``to_text``).

    ``reply`` is the text as smtplib gives it: the remote's bytes, or a str
    of smtplib's own when it gave up reading one (a line over 8192 octets
    is its "500 Line too long.").
    """
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", errors="replace")
    # One line (smtplib joins a multi-line reply with LF), and the remote's
    # control characters escaped: the text goes to the log, 'queue list' and
    # bounces, all read on somebody's terminal.
    text = elided(escape_controls(reply.replace("\n", " ")), SMTP_CLIENT_REPLY_KEPT)
    match = ENHANCED_STATUS.match(text)
    klass = str(code)[0]
    state = {"2": State.DELIVERED if to_text else State.PENDING, "5": State.FAILED}.get(klass, State.PENDING)
    status = match.group(0) if match and match.group(1) == klass else f"{klass}.0.0"
    if state is State.PENDING and not status.startswith("4"):
        status = "4.0.0"  # an odd reply (3xx, or 2xx where 354 belongs) is no reason to give up
    return Outcome(state, status, f"smtp; {code} {text}", hop.name)


def header_of(message: bytes) -> bytes:
    """The message's header: all before the first empty line (RFC 5322 §2.1)."""
    return re.split(rb"\r?\n\r?\n", message, maxsplit=1)[0]


def count_hops(message: bytes) -> int:
    """How many Received: fields the message's header has (RFC 5321 §6.3)."""
    return len(_RECEIVED.findall(header_of(message)))


def without_return_path(message: bytes) -> bytes:
    """The message without the Return-Path: field our SMTP server put first.

    RFC 5321 §4.4: Return-Path is added at final delivery; a message passed
    on should not carry one (the sender "SHOULD NOT send" one, a relay "MAY
    remove" it). Ours is always the first line, so we need not (and, as a
    relay, must not) look any further into the message.
    """
    return _RETURN_PATH.sub(b"", message, count=1)


def _host_name(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def wire_format(message: bytes) -> bytes:
    """CRLF line ends for SMTP (RFC 5321 §2.3.8); smtplib does not convert bytes."""
    return re.sub(rb"\r?\n", b"\r\n", message)


class MxResolver:
    """Where mail for a domain goes, from DNS (RFC 5321 §5.1, RFC 7505).

    dnspython is imported at the first lookup rather than with this module:
    it takes about 40 ms, a tenth of the server's start-up, and only mail for
    another domain, with no smarthost, needs it. A server about to become
    another user loads it first (``load_before_switching_user``).
    """

    @staticmethod
    def load_before_switching_user() -> None:
        """Import dnspython now: the account the server becomes may not be
        able to read the Python it comes with."""
        # dnspython loads a record type's class at its first answer, and
        # where it cannot, reads the record as generic data: so the types
        # we look up (and those an answer brings along) are loaded too.
        for module in ("dns.exception", "dns.name", "dns.resolver", "dns.rdtypes.ANY.CNAME", "dns.rdtypes.ANY.MX",
                       "dns.rdtypes.ANY.SOA", "dns.rdtypes.IN.A", "dns.rdtypes.IN.AAAA"):
            importlib.import_module(module)

    def __init__(self, dns_server: str | None = None) -> None:
        self._dns_server = dns_server
        self._resolver: dns.resolver.Resolver | None = None

    def _get_resolver(self, domain: str) -> dns.resolver.Resolver:
        import dns.exception  # here, not at the top: see the class docstring
        import dns.resolver

        if self._resolver is None:
            try:
                resolver = dns.resolver.Resolver(configure=self._dns_server is None)
            except dns.exception.DNSException as error:  # e.g. no /etc/resolv.conf
                raise _dns_failure(domain, error) from None
            if self._dns_server is not None:
                host, port = parse_host_port(self._dns_server, 53)
                resolver.nameservers = [host]
                resolver.port = port
            self._resolver = resolver
        return self._resolver

    def hops(self, domain: str, port: int, myself: str | None = None) -> list[Hop]:
        """Every (host, address) to try for ``domain``, best first; RouteError if none.

        ``myself`` is this server's host name: if it is an MX host of the
        domain, only the better ones are tried (see below).
        """
        import dns.exception  # here, not at the top: see the class docstring
        import dns.name
        import dns.resolver

        resolver = self._get_resolver(domain)
        # Asked as an A-label we make (IDNA 2008): given a U-label, dnspython
        # without the idna package maps it by IDNA 2003, straße to strasse.
        asked = canonical_domain(domain)
        implicit = False
        try:
            records = list(resolver.resolve(asked, "MX"))
        except dns.resolver.NXDOMAIN:
            raise RouteError(Outcome(State.FAILED, STATUS_NO_SUCH_DOMAIN,
                                     _local_diagnostic(f"the domain {domain} does not exist"))) from None
        except dns.resolver.NoAnswer:
            records, implicit = [], True
        except (dns.exception.SyntaxError, dns.name.IDNAException) as error:
            # No such name can exist (a label over 63 octets once in IDNA
            # form, RFC 1035 §2.3.4): asking again later will not help.
            raise RouteError(Outcome(State.FAILED, STATUS_NO_SUCH_DOMAIN,
                                     _local_diagnostic(f"{domain} cannot be a domain name: {error}"))) from None
        except dns.exception.DNSException as error:
            raise _dns_failure(domain, error) from None
        if len(records) == 1 and records[0].exchange == dns.name.root:
            raise RouteError(Outcome(State.FAILED, STATUS_NULL_MX, _local_diagnostic(
                f"{domain} has a null MX record (RFC 7505): it accepts no mail")))
        # Lowest preference first; among equals a random order (§5.1).
        records.sort(key=lambda record: (record.preference, random.random()))
        # §5.1: a relay host that finds itself among the MX hosts: "all
        # records at that preference level and higher-numbered ones MUST be
        # discarded from consideration": we are a backup MX passing mail to
        # a better one. Sent to our own level or lower, it would come
        # straight back to us.
        mine = [record.preference for record in records
                if myself is not None and _host_name(record.exchange) == myself.lower()]
        if mine:
            records = [record for record in records if record.preference < min(mine)]
            if not records:
                raise RouteError(Outcome(State.FAILED, STATUS_LOOP, _local_diagnostic(
                    f"mail for {domain} loops back to myself: {myself} is its best MX host")))
        # Host names as DNS has them: a UTF-8 domain as its A-label (for TLS's
        # SNI and the bounce's Remote-MTA, which take no other form).
        names = [_host_name(dns.name.from_text(asked))] if implicit else [
            _host_name(record.exchange) for record in records if record.exchange != dns.name.root]
        hops: list[Hop] = []
        lookup_failed: dns.exception.DNSException | None = None
        for name in names:
            for rdtype in ("A", "AAAA"):  # both families, IPv4 first
                try:
                    hops += [Hop(name, record.address, port) for record in resolver.resolve(name, rdtype)]
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                    continue
                except dns.exception.DNSException as error:
                    lookup_failed = error
        if hops:
            return hops
        if lookup_failed is not None:
            raise _dns_failure(domain, lookup_failed)
        if implicit:
            raise RouteError(Outcome(State.FAILED, STATUS_NO_SUCH_DOMAIN, _local_diagnostic(
                f"{domain} has no MX record and no address: it takes no mail")))
        # MX records whose hosts have no address: perhaps a mistake being fixed.
        raise RouteError(Outcome(State.PENDING, STATUS_DNS_FAILURE, _local_diagnostic(
            f"no MX host of {domain} has an address ({', '.join(names)})")))


def _dns_failure(domain: str, error: Exception) -> RouteError:
    return RouteError(Outcome(State.PENDING, STATUS_DNS_FAILURE,
                              _local_diagnostic(f"DNS lookup for {domain} failed: {error}")))


class Relay:
    """The delivery threads of one server (``start``/``stop``), and one delivery attempt (``attempt``)."""

    def __init__(self, context: "ServerContext") -> None:
        self.context = context
        self.settings = context.settings
        self.queue = context.queue
        relay = self.settings.relay
        self._smarthost = parse_host_port(relay.smarthost, 25) if relay.smarthost else None
        # Only a smarthost can be made to require TLS; an MX host is always
        # opportunistic, since nothing says which MX hosts can do TLS.
        self._tls_policy = relay.smarthost_tls_policy if self._smarthost else "opportunistic"
        # Made now, before --run-as: the CA file is read here, as root may
        # read it (read at each delivery, a file the server's user could
        # not read deferred every message until it bounced, days later).
        try:
            self._tls_client_context = client_context(self._tls_policy == "verified", relay.smarthost_ca_file)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"relay.smarthost_ca_file: cannot load {str(relay.smarthost_ca_file)!r}: "
                              f"{error}") from None
        self._resolver = MxResolver(relay.dns_server)
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._wakeup = threading.Condition()
        self._wakeups = 0  # counts wake() calls, so a wake between two looks is not lost
        self._claim_lock = threading.Lock()
        self._in_flight: set[str] = set()
        # The last look into the queue (_claim): what it found due and not yet
        # handed out, when it was taken, and the wake() count then.
        self._due: deque[str] = deque()
        self._looked_at = -math.inf
        self._wakeups_at_look = 0
        # Outcomes of attempts that were made but could not be written down
        # (a full disk): written before that message is sent anywhere again.
        self._unrecorded: dict[str, dict[str, Outcome]] = {}
        # Likewise the recipients whose failures were bounced, but not yet
        # written down as reported: no second bounce goes out for them.
        self._unrecorded_bounces: dict[str, list[str]] = {}
        self._queue_unreadable = False  # the last look into the queue failed (logged once, by _work)

    # --- the threads -----------------------------------------------------------

    def start(self) -> "Relay":
        removed = self.queue.remove_stale_files()
        if removed:
            log.info("removed %s from the queue", counted(removed, "stale file"))
        queued = len(self.queue.ids())
        if queued:
            log.info("resuming %s", counted(queued, "queued message"))
        if self._smarthost and self.settings.relay.smarthost_user and self._tls_policy != "verified":
            log.warning("relay.smarthost_tls is %r: the smarthost password goes over TLS whose certificate "
                        "is not checked, so whoever can stand between the hosts can take it", self._tls_policy)
        self._stopping.clear()
        self.queue.wakeup = self.wake
        for number in range(1, self.settings.relay.workers + 1):
            thread = threading.Thread(target=self._work, name=f"relay-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.wake()
        with self._claim_lock:
            under_way = len(self._in_flight)
        if under_way:  # else a slow host's delivery holds the stop up without a word
            log.info("stopping: waiting up to %gs for %s under way; what is not done stays queued",
                     STOP_WAIT_SECONDS, counted(under_way, "delivery", "deliveries"))
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        if self.queue.wakeup == self.wake:
            self.queue.wakeup = None

    def wake(self) -> None:
        """Look into the queue now (called after an enqueue or a flush)."""
        with self._wakeup:
            self._wakeups += 1
            self._wakeup.notify_all()

    def _work(self) -> None:
        while not self._stopping.is_set():
            with self._wakeup:
                seen = self._wakeups
            try:
                queue_id = self._claim()
            except Exception as error:  # e.g. the queue directory unreadable: look again after the wait
                with self._claim_lock:  # as _claim clears it: a look that works meanwhile is not lost
                    news, self._queue_unreadable = not self._queue_unreadable, True
                if news:  # once, not at every look by every worker
                    # The disk's own complaint is one line; anything else is a bug, with its traceback.
                    log.error("cannot look into the queue (%s); trying again every %gs", error,
                              self.settings.relay.queue_scan_interval, exc_info=not isinstance(error, OSError))
                queue_id = None
            if queue_id is None:
                with self._wakeup:
                    self._wakeup.wait_for(lambda: self._wakeups != seen or self._stopping.is_set(),
                                          timeout=self.settings.relay.queue_scan_interval)
                continue
            try:
                self.attempt(queue_id)
            except Exception as error:  # one broken message must not stop a worker
                # In memory: the failure may be the disk itself (ENOSPC
                # while recording the outcome), and then next_attempt in the
                # envelope never moves and the message would be due at once.
                wait = self.queue.retry.min_backoff
                self.queue.postpone_in_memory(queue_id, time.monotonic() + wait)
                # The disk's own complaint (a full disk while recording) is
                # one line; anything else is a bug, with its traceback.
                log.error("delivery of %s failed (%s); it stays queued, tried again in %gs", queue_id, error,
                          wait, exc_info=not isinstance(error, OSError))
            finally:
                with self._claim_lock:
                    self._in_flight.discard(queue_id)

    def _claim(self, look_again: bool = False) -> str | None:
        """A due message that no other thread is delivering, now ours; None if none.

        The threads share their looks into the queue: the messages one look
        found due are handed out in turn, and the next look is taken once
        they are all out, and then only after a wake() or a whole scan
        interval (or at once, ``look_again``). So a queue of n messages is
        read once a batch, not once a message, nor once a second by every
        thread.
        """
        with self._claim_lock:
            if not self._due and (look_again or self._wakeups != self._wakeups_at_look
                                  or time.monotonic() - self._looked_at >= self.settings.relay.queue_scan_interval):
                self._wakeups_at_look, self._looked_at = self._wakeups, time.monotonic()
                self._due = deque(entry.queue_id for entry in self.queue.due())
                self._queue_unreadable = False  # this look worked: a failure again is news
            while self._due:
                queue_id = self._due.popleft()  # the longest-waiting first
                if queue_id not in self._in_flight:
                    self._in_flight.add(queue_id)
                    return queue_id
        return None

    def run_once(self) -> int:
        """Make one attempt at every due message, in this thread; returns how many.

        For tests and for watching a delivery step by step; the threads call
        ``attempt`` the same way.
        """
        attempted = 0
        while (queue_id := self._claim(look_again=True)) is not None:
            try:
                self.attempt(queue_id)
            finally:
                with self._claim_lock:
                    self._in_flight.discard(queue_id)
            attempted += 1
        return attempted

    # --- one attempt at one message ----------------------------------------------

    def attempt(self, queue_id: str) -> None:
        """Try every pending recipient once, record the outcomes, bounce failures."""
        entry = self.queue.get(queue_id)
        if entry is None:
            return  # delivered or deleted meanwhile
        outcomes = self._unrecorded.pop(queue_id, None)
        # Asked again, from the envelope just read: _claim hands out ids from
        # a look that may be seconds old, and another thread may have tried
        # this message since. Not due now, it is not sent again.
        due = entry.pending and entry.next_attempt <= time.time()
        try:
            message = self.queue.message_path(queue_id).read_bytes()
        except OSError as error:
            message = b""  # a bounce then quotes no header
            unreadable = _message_file_failure(error)
            log.error("%s: %s", queue_id, unreadable.diagnostic)
            if outcomes is None and due:
                outcomes = dict.fromkeys([recipient.address for recipient in entry.pending], unreadable)
        if outcomes is None and due:
            outcomes = self._deliver(entry, message)
            for address, outcome in outcomes.items():
                log.info("%s: to=<%s> relay=%s %s: %s", queue_id, address, outcome.remote_mta or "none",
                         outcome.state, outcome.diagnostic)
        if outcomes is not None:
            try:
                entry = self.queue.record(queue_id, outcomes)  # now: after the attempt, which took time
            except Exception:
                # Else the envelope still says "pending" and every retry would
                # send another copy. After a restart it is one copy more at
                # most, the duplicate RFC 5321 §6.1 accepts.
                self._unrecorded[queue_id] = outcomes
                raise
            if entry is None:
                return
        if entry.unreported_failures:
            entry = self._report(entry, message)
        if entry is not None and entry.finished:
            self.queue.delete(queue_id)

    def _deliver(self, entry: QueueEntry, message: bytes) -> dict[str, Outcome]:
        pending = [recipient.address for recipient in entry.pending]
        hops = count_hops(message)
        if hops > self.settings.relay.max_hops:
            # "section", not the sign: a DSN's Diagnostic-Code is ASCII (RFC 3464 §2.3.6).
            loop = Outcome(State.FAILED, STATUS_LOOP, _local_diagnostic(
                f"mail loop: the message has {hops} Received: header fields, more than "
                f"{self.settings.relay.max_hops} (RFC 5321 section 6.3)"))
            return {address: loop for address in pending}
        outgoing = wire_format(without_return_path(message))
        outcomes: dict[str, Outcome] = {}
        by_domain: dict[str, list[str]] = {}
        for address in pending:
            domain = address.rpartition("@")[2].lower()
            if in_domains(domain, self.settings.domains):
                outcomes[address] = self.deliver_locally(entry.sender, address, message)
            else:
                by_domain.setdefault(domain, []).append(address)
        if self._smarthost is not None and by_domain:
            # The smarthost takes every recipient in one transaction.
            host, port = self._smarthost
            by_domain = {"": [address for addresses in by_domain.values() for address in addresses]}
        settled: set[str] = set()  # recipients this attempt has written down so far
        settle = functools.partial(self._settle, entry.queue_id, settled)
        for domain, addresses in by_domain.items():
            # Before each transaction, who is done so far (the local
            # deliveries above, the domains before this one): a crash in it
            # then delivers to none of them again.
            settle(outcomes)
            try:
                hops_to_try = [Hop(host, host, port)] if self._smarthost else self._route(domain)
            except RouteError as error:
                outcomes.update(dict.fromkeys(addresses, error.outcome))
                continue
            try:
                outcomes.update(self._send(hops_to_try, entry.sender, addresses, outgoing, settle))
            except Exception as error:
                # A bug of ours, met in talking to some server: a failed
                # attempt all the same, recorded, so the retries back off
                # and the message still ends, bounced, after its lifetime.
                # The diagnostic names only the exception's kind: its text
                # may hold what it was handed (a password, say), and the
                # diagnostic goes into queue list and the sender's bounce.
                log.exception("%s: delivery to %s failed unexpectedly", entry.queue_id, domain or "the smarthost")
                outcomes.update(dict.fromkeys(addresses, Outcome(State.PENDING, STATUS_LOCAL_ERROR, _local_diagnostic(
                    f"local error: {type(error).__name__} (see the server's log)"))))
        return outcomes

    def _settle(self, queue_id: str, settled: set[str], outcomes: dict[str, Outcome]) -> None:
        """Before the next transaction (to the next host, or the next chunk
        for this one) and before QUIT, write down the recipients done with
        that are not yet in ``settled``, and add them to it.

        Should the server die or stop after that, they are not sent again
        (the one duplicate RFC 5321 §6.1 accepts is the message in flight).
        A failure to write is no reason to stop: the attempt's record()
        tries again at its end.
        """
        done = {address: outcome for address, outcome in outcomes.items()
                if outcome.state is not State.PENDING and address not in settled}
        if not done:
            return
        try:
            self.queue.settle(queue_id, done)
        except (OSError, StorageError) as error:
            log.warning("%s: cannot write down the recipients done so far: %s", queue_id, error)
            return
        settled.update(done)

    def _route(self, domain: str) -> list[Hop]:
        port = self.settings.relay.port
        if domain.startswith("["):  # an address literal (RFC 5321 §4.1.3): no DNS
            address = re.sub(r"(?i)^ipv6:", "", domain[1:-1])
            return [Hop(domain, address, port)]
        return self._resolver.hops(domain, port, myself=self.settings.hostname)

    def _send(self, hops: list[Hop], sender: str, recipients: list[str], data: bytes,
              settle: Callable[[dict[str, Outcome]], None]) -> dict[str, Outcome]:
        """Try the hops in order until one takes part in a transaction (§5.1).
        ``settle`` writes down the outcomes each transaction gives, before the next or QUIT."""
        failure: HopFailed | None = None
        for hop in hops:
            try:
                try:
                    return self._transaction(hop, sender, recipients, data, settle)
                except StartTlsFailed as error:
                    if self._tls_policy != "opportunistic":
                        raise
                    # RFC 7435 §1.2: for opportunistic security cleartext is
                    # the baseline and TLS a gain when it works, so a TLS
                    # failure is no reason to keep the mail from a host that
                    # takes it in plaintext. A host that broke TLS mid-
                    # handshake is in no known state: start on a new connection.
                    log.warning("%s: %s; delivering without TLS", hop, error)
                    return self._transaction(hop, sender, recipients, data, settle, starttls=False)
            except HopFailed as error:
                log.info("%s: %s", hop, error)
                failure = error
        return dict.fromkeys(recipients, failure.outcome)

    def _transaction(self, hop: Hop, sender: str, recipients: list[str], data: bytes,
                     settle: Callable[[dict[str, Outcome]], None], starttls: bool = True) -> dict[str, Outcome]:
        try:
            client = _HopClient(hop, local_hostname=self.settings.hostname, timeout=self.settings.relay.timeout)
        except smtplib.SMTPConnectError as error:  # a greeting other than 220
            outcome = outcome_of_reply(error.smtp_code, error.smtp_error, hop)
            raise HopFailed(hop, "4" + outcome.status[1:], outcome.diagnostic) from None
        except (OSError, smtplib.SMTPException) as error:
            raise HopFailed(hop, STATUS_NO_ANSWER,
                            _local_diagnostic(f"connect to {hop}: {error.strerror or error}")) from None
        try:
            try:
                self._hello(client, hop, starttls)
            except (OSError, smtplib.SMTPException) as error:
                raise HopFailed(hop, STATUS_BAD_CONNECTION,
                                _local_diagnostic(f"{hop} failed before MAIL: {error}")) from None
            outcomes: dict[str, Outcome] = {}
            waiting = recipients
            while waiting:
                try:
                    sent = self._mail(client, hop, sender, waiting, data)
                except HopFailed as refused:  # MAIL refused for now
                    if not outcomes:
                        raise  # nothing went to this host: the next may take it all
                    # The rest waits for the retry: the next host would be
                    # sent the first chunk again as well.
                    sent = dict.fromkeys(waiting, refused.outcome)
                outcomes.update(sent)
                # Written down at once, before the next chunk or QUIT (whose
                # reply may be slow to come): stopped or killed meanwhile,
                # the server would send them again after the restart, though
                # this host has taken them (RFC 5321 §6.1). One queue write
                # more per message, for no copy sent twice.
                settle(outcomes)
                # RFC 5321 §4.5.3.1.10: a server may take only so many
                # recipients a message (100 at least, §4.5.3.1.8) and refuse
                # the rest with 452 4.5.3. They go in the next transaction,
                # at once, as long as each one delivers to somebody.
                if not any(outcome.state is State.DELIVERED for outcome in sent.values()):
                    break
                waiting = [address for address, outcome in sent.items()
                           if outcome.state is State.PENDING and outcome.status == STATUS_TOO_MANY_RECIPIENTS]
            _quietly(client.quit)
            return outcomes
        finally:
            client.close()

    def _hello(self, client: smtplib.SMTP, hop: Hop, starttls: bool = True) -> None:
        """EHLO (or HELO), STARTTLS when offered (unless ``starttls`` is False), AUTH at the smarthost."""
        # RFC 5321 §4.1.1.1: 250 is the one success EHLO and HELO have (and
        # smtplib reads the extensions only from a 250). §4.1.4: a server
        # that does not know EHLO refuses it with a 5yz, and only then is
        # HELO worth a try; a 4yz (421 busy, say) is a failure for now.
        code, reply = client.ehlo()
        if 500 <= code <= 599:
            code, reply = client.helo()
        if code != 250:
            raise _hello_refused(hop, code, reply)
        relay = self.settings.relay
        if starttls and client.has_extn("starttls"):
            try:
                # Here smtplib wraps the socket in TLS, with server_hostname
                # the MX host's name, not its address: see _HopClient for why.
                client.starttls(context=self._tls_client_context)
            except smtplib.SMTPResponseException as error:  # e.g. 454 TLS not available (RFC 3207 §4)
                refusal = outcome_of_reply(error.smtp_code, error.smtp_error, hop)
                raise StartTlsFailed(hop, "4" + refusal.status[1:], _local_diagnostic(
                    f"{hop} refused STARTTLS: {refusal.diagnostic.removeprefix('smtp; ')}")) from None
            except OSError as error:  # ssl.SSLError, or the peer hung up mid-handshake
                raise StartTlsFailed(hop, STATUS_BAD_CONNECTION,
                                     _local_diagnostic(f"TLS handshake with {hop} failed: {error}")) from None
            except UnicodeError:
                # A name the idna codec refuses for SNI (a label dnspython
                # wrote past 63 characters with \DDD escapes, from octets
                # in the MX record): TLS cannot start, and for an MX host
                # the mail goes in plaintext, as when the handshake fails.
                raise StartTlsFailed(hop, STATUS_BAD_CONNECTION, _local_diagnostic(
                    f"TLS with {hop} cannot start: its name cannot be sent as the TLS server name")) from None
            # RFC 3207 §4.2: start over; the server may offer more now. Whatever
            # it offered before TLS is forgotten: without a 250 here, nothing.
            code, reply = client.ehlo()
            if code != 250:
                raise _hello_refused(hop, code, reply)
        elif self._tls_policy != "opportunistic":
            raise HopFailed(hop, STATUS_SECURITY, _local_diagnostic(
                f"{hop} does not offer STARTTLS, which relay.smarthost_tls requires"))
        if self._smarthost and relay.smarthost_user:
            if not isinstance(client.sock, ssl.SSLSocket):
                raise HopFailed(hop, STATUS_SECURITY, _local_diagnostic(
                    f"will not send the smarthost password to {hop} without TLS"))
            try:
                client.login(relay.smarthost_user, relay.smarthost_password or "")
            except smtplib.SMTPAuthenticationError as error:
                # Our configuration is wrong, not the sender's mail: retry
                # (Postfix's smtp_sasl_auth_soft_bounce does the same).
                raise HopFailed(hop, STATUS_SECURITY, outcome_of_reply(
                    error.smtp_code, error.smtp_error, hop).diagnostic) from None

    def _mail(self, client: smtplib.SMTP, hop: Hop, sender: str, recipients: list[str],
              data: bytes) -> dict[str, Outcome]:
        """MAIL, one RCPT per recipient, DATA: every recipient gets its own outcome."""
        outcomes = self._beyond_this_host(client, hop, sender, recipients, data)
        recipients = [address for address in recipients if address not in outcomes]
        if not recipients:
            return outcomes
        options = []
        if client.has_extn("size"):
            options.append(f"SIZE={len(data)}")  # RFC 1870
        # Each offered, or _beyond_this_host has failed the message.
        if not data.isascii():
            options.append("BODY=8BITMIME")  # RFC 6152
        if not (sender.isascii() and header_of(data).isascii() and all(map(str.isascii, recipients))):
            options.append("SMTPUTF8")  # RFC 6531
        try:
            code, reply = client.mail(sender, options)
            if not is_positive(code):
                _quietly(client.rset)
                refusal = outcome_of_reply(code, reply, hop)
                if refusal.state is State.PENDING:
                    # RFC 5321 §5.1: try each host "until a delivery attempt
                    # succeeds"; one that will not take mail now (421 closing,
                    # 451) is no reason to keep it from the next.
                    raise HopFailed(hop, refusal.status, refusal.diagnostic)
                outcomes.update(dict.fromkeys(recipients, refusal))
                return outcomes
            accepted = []
            for address in recipients:
                code, reply = client.rcpt(address)
                if is_positive(code):
                    accepted.append(address)
                elif code == 552:
                    # RFC 5321 §4.5.3.1.10: "too many recipients" from an old
                    # server; the client "SHOULD treat a 552 code in this case
                    # as a temporary, rather than permanent, failure".
                    refusal = outcome_of_reply(code, reply, hop)
                    outcomes[address] = dataclasses.replace(refusal, state=State.PENDING,
                                                            status="4" + refusal.status[1:])
                else:
                    outcomes[address] = outcome_of_reply(code, reply, hop)
            if not accepted:
                _quietly(client.rset)
                return outcomes
            try:
                code, reply = client.data(data)
                outcome = outcome_of_reply(code, reply, hop, to_text=True)
            except smtplib.SMTPDataError as error:  # no 354 to DATA: the text never went
                outcome = outcome_of_reply(error.smtp_code, error.smtp_error, hop)
            outcomes.update(dict.fromkeys(accepted, outcome))
        except (OSError, smtplib.SMTPException) as error:
            lost = Outcome(State.PENDING, STATUS_BAD_CONNECTION,
                           _local_diagnostic(f"lost connection with {hop}: {error}"), hop.name)
            for address in recipients:
                outcomes.setdefault(address, lost)
        return outcomes

    @staticmethod
    def _beyond_this_host(client: smtplib.SMTP, hop: Hop, sender: str, recipients: list[str],
                          data: bytes) -> dict[str, Outcome]:
        """The recipients whose mail this host may not be sent, as it lacks an extension.

        RFC 6531 §3.2: without SMTPUTF8, no non-ASCII address goes (X.6.7;
        a sender's concerns every recipient, a recipient's only itself), and
        no UTF-8 header (X.6.9). RFC 6152 §3: without 8BITMIME, no 8-bit
        text goes; the client converts it to 7 bits or fails it, and
        converting would mean rewriting its MIME structure, so we fail it.
        """
        def lacking(status: str, extension: str, what: str) -> Outcome:
            return Outcome(State.FAILED, status, _local_diagnostic(
                f"{hop.name} does not offer {extension}, which {what} needs"), hop.name)

        if not data.isascii() and not client.has_extn("8bitmime"):
            return dict.fromkeys(recipients, lacking(STATUS_NEEDS_8BITMIME, "8BITMIME", "the 8-bit text"))
        if client.has_extn("smtputf8"):
            return {}
        if not header_of(data).isascii():
            return dict.fromkeys(recipients, lacking(STATUS_UTF8_HEADER, "SMTPUTF8", "the UTF-8 header"))
        needing = recipients if not sender.isascii() else [address for address in recipients
                                                           if not address.isascii()]
        return dict.fromkeys(needing, lacking(STATUS_NEEDS_SMTPUTF8, "SMTPUTF8", "a non-ASCII address"))

    # --- local recipients and bounces -----------------------------------------------

    def deliver_locally(self, sender: str, address: str, message: bytes) -> Outcome:
        """Deliver to an address of our own domain, through the aliases.

        An alias can have users here and addresses elsewhere. Delivery to
        it is all or nothing, in smtp.Spool's order: the copy for elsewhere
        is queued held, the Maildirs get theirs, and the held copy is
        released; a failure before the release takes the held copy back and
        leaves this recipient pending, to be tried again whole. No retry
        then repeats a copy, here or elsewhere: with the Maildirs first,
        each retry while the queue refused the outside copy gave the users
        here one more. Only a failed release repeats the local copies, as
        in SMTP.
        """
        local_part = unquoted_local_part(address.rpartition("@")[0])
        try:
            expansion = self.context.aliases.expand(local_part)
            if not expansion:
                return Outcome(State.FAILED, STATUS_NO_SUCH_USER,
                               _local_diagnostic(f"no such user or alias here: {local_part}"))
            held = None
            if expansion.external:  # forwarded on, keeping the original sender for bounces
                held = self.queue.enqueue(sender, expansion.external, message, held=True)
            try:
                if expansion.users:
                    self._deliver_to_maildirs(expansion.users, sender, message)
            except BaseException:
                if held is not None:
                    self.queue.take_back(held)
                raise
            if held is not None:
                self.queue.release(held)
        except (StorageError, UnusableFile) as error:  # a Maildir, users.json or aliases: the mail waits
            return Outcome(State.PENDING, STATUS_LOCAL_ERROR, _local_diagnostic(f"local delivery failed: {error}"))
        return Outcome(State.DELIVERED, STATUS_DELIVERED, _local_diagnostic("delivered locally"))

    def _deliver_to_maildirs(self, users: Iterable[str], sender: str, message: bytes) -> None:
        text = without_return_path(message).replace(b"\r\n", b"\n")
        incoming = self.context.store.receive(users)
        try:
            incoming.write(f"Return-Path: <{sender}>\n".encode("utf-8") + text)
            incoming.commit()
        except BaseException:
            incoming.discard()
            raise

    def _report(self, entry: QueueEntry, message: bytes) -> QueueEntry | None:
        """Bounce the failures not yet reported (RFC 3464), unless the sender is <>."""
        if (bounced := self._unrecorded_bounces.pop(entry.queue_id, None)) is not None:
            return self._reported(entry.queue_id, bounced)
        failures = entry.unreported_failures
        addresses = [recipient.address for recipient in failures]
        if not entry.sender:
            # RFC 5321 §6.1: "if this address is null ("<>"), the
            # receiver-SMTP MUST NOT send a notification" (such a message is
            # itself one, §4.5.5): bouncing it could start an endless exchange.
            log.info("%s: not bounced, the sender is <>: %s", entry.queue_id, ", ".join(addresses))
            return self.queue.mark_reported(entry.queue_id, addresses)
        bounce = build_bounce(entry, failures, message, self.settings.hostname, time.time())
        try:
            outcome = None
            if in_domains(entry.sender.rpartition("@")[2], self.settings.domains):
                outcome = self.deliver_locally("", entry.sender, bounce)
                if outcome.state is State.FAILED:
                    log.warning("%s: the bounce to <%s> cannot be delivered: %s", entry.queue_id,
                                entry.sender, outcome.diagnostic)
            if outcome is None or outcome.state is State.PENDING:
                bounce_id = self.queue.enqueue("", [entry.sender], bounce)
                log.info("%s: bounce %s queued for <%s>", entry.queue_id, bounce_id, entry.sender)
        except StorageError as error:
            log.error("%s: cannot queue the bounce, will try again: %s", entry.queue_id, error)
            return self.queue.postpone(entry.queue_id, time.time() + self.queue.retry.min_backoff)
        return self._reported(entry.queue_id, addresses)

    def _reported(self, queue_id: str, addresses: list[str]) -> QueueEntry | None:
        """Write down that the failures of ``addresses`` were bounced; kept in
        memory while the disk will not take it (as _unrecorded is), else every
        retry would send the sender another bounce."""
        try:
            return self.queue.mark_reported(queue_id, addresses)
        except Exception:
            self._unrecorded_bounces[queue_id] = addresses
            raise


class _HopClient(smtplib.SMTP):
    """An ``smtplib.SMTP`` connected to one address of a host, which keeps the host's name.

    smtplib wraps the socket for STARTTLS with ``server_hostname=`` the host
    it was given, and we must connect to the address we chose (§5.1: each
    address of each MX host in turn). So the name goes to smtplib and only
    the socket goes to the address. The name matters in the handshake:

    * it is sent as SNI, the TLS extension that names the server wanted
      (RFC 6066 §3, which allows no address literals there), so a machine
      that is the MX host of several domains can present the certificate
      for the name we looked up. DANE for SMTP (RFC 7672) requires SNI
      with the MX host's name for this reason;
    * it is the name a verified certificate must match (RFC 6125 §6), which
      ``relay.smarthost_tls = "verified"`` checks. An address would match
      only a certificate issued for that address.
    """

    def __init__(self, hop: Hop, **options) -> None:
        self._address = hop.address
        super().__init__(hop.server_name, hop.port, **options)  # connects, through _get_socket

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return super()._get_socket(self._address, port, timeout)

    def data(self, msg: bytes) -> tuple[int, bytes]:
        """DATA and the text, with SMTP_CLIENT_DATA_TIMEOUT_SECONDS at least
        for their replies: a host slow to answer the final dot has the
        message, and giving up on it sends the message again."""
        step_timeout = self.timeout
        self.timeout = max(step_timeout, SMTP_CLIENT_DATA_TIMEOUT_SECONDS)
        self.sock.settimeout(self.timeout)
        try:
            return super().data(msg)
        finally:
            self.timeout = step_timeout
            if self.sock is not None:  # smtplib closes it on a lost connection
                self.sock.settimeout(step_timeout)

    def getreply(self) -> tuple[int, bytes]:
        """smtplib's reply, in ``self.timeout`` all told (relay.timeout; more for DATA). Its own timeout is
        per read: a host that drips a reply, an octet or a line at a time,
        would hold this delivery thread as long as it liked (RFC 5321
        §4.5.3.2 times each command's whole reply). And in
        SMTP_CLIENT_REPLY_MAX octets: smtplib keeps every line of a reply."""
        if self.file is None:  # as smtplib makes it, at the first reply and after STARTTLS
            self.file = _MeteredReply(self.sock.makefile("rb"))
        self.file.octets_left = SMTP_CLIENT_REPLY_MAX
        watchdog = threading.Timer(self.timeout, self._cut_off)
        watchdog.daemon = True
        watchdog.start()
        try:
            return super().getreply()
        finally:
            watchdog.cancel()

    def _cut_off(self) -> None:
        """From the watchdog's thread: end the read in progress (getreply
        then raises SMTPServerDisconnected). socket.socket's own shutdown,
        on the descriptor, as for a TLS socket too (see transport._shut)."""
        if self.sock is not None:
            try:
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            except OSError:
                pass  # closed meanwhile


class _MeteredReply:
    """The connection's file, as smtplib reads a reply from it a line at a
    time, with ``octets_left`` for the reply: past them, an OSError, which
    smtplib's getreply turns into a lost connection."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.octets_left = SMTP_CLIENT_REPLY_MAX

    def readline(self, limit: int = -1) -> bytes:
        if self.octets_left <= 0:
            raise OSError(f"a reply of more than {SMTP_CLIENT_REPLY_MAX} octets")
        line = self._file.readline(limit)
        self.octets_left -= len(line)
        return line

    def close(self) -> None:
        self._file.close()


def _hello_refused(hop: Hop, code: int, reply: bytes) -> HopFailed:
    """EHLO or HELO refused: this host takes no mail now, whatever the code
    (the next host may, or the retry)."""
    return HopFailed(hop, STATUS_BAD_CONNECTION, outcome_of_reply(code, reply, hop).diagnostic)


def _quietly(command) -> None:
    """RSET or QUIT, whose failure changes nothing we have learnt."""
    try:
        command()
    except (OSError, smtplib.SMTPException):
        pass
