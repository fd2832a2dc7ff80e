"""The outbound queue: mail for other hosts, kept on disk until it is delivered.

(Named ``outqueue``, not ``queue``: a module called ``queue`` next to
``relay.py`` would stand in for the standard library's ``queue`` whenever
this directory is on ``sys.path``, e.g. when a file here is run as a script.)

An MTA that answers ``250`` to DATA has taken responsibility for the message
(RFC 5321 §4.1.1.4, §6.1): it may not lose it afterwards, crash or not. So a
message for another host is written to ``ROOT/.pymailsrv/queue/`` before
the client hears 250, with the discipline of ``maildir.py``::

    queue/tmp/<id>   the text being received: written, flushed, fsynced
    queue/<id>.msg   ... then renamed here
    queue/<id>.json  the envelope, written atomically (durable.write_atomically),
                     then the directory is fsynced: now the message is queued

The envelope file is the commit record: a message is in the queue exactly
when its ``.json`` exists. A crash before that leaves a ``.msg`` without an
envelope (or a file in ``tmp/``), which nobody was promised and which
``remove_stale_files`` clears; deleting removes the ``.json`` first for the
same reason.

A message can also be queued *held*, for a caller that may yet take it
back: the SMTP session queues a message's outside copy held, delivers the
local copies, and only then lets the copy go (``smtp.Spool``)::

    queue/tmp/<id>.json  a held message's envelope, written atomically: nothing
                         lists tmp/, so no relay sees the message yet
    queue/<id>.json      release() renames it here and fsyncs the directory:
                         now it is queued, and the client may hear 250

The hold is a file, so every process sees it, and so does a server that
restarts after a crash: a held message that is never released is never
sent. Its files are left to ``remove_stale_files`` like any other.

The envelope holds the reverse-path (``""`` is the null path ``<>``), the
arrival time, the next attempt time, how many attempts were made, and every
recipient with its own state: ``pending`` until a delivery attempt says
``delivered`` or ``failed`` for it. One message to two hosts can thus be
delivered to one and retried for the other (RFC 5321 §3.3 answers each
RCPT on its own, and §4.5.3.1.10 has the client retry only "those addresses
that received 452 responses").

Retries follow ``RetryPolicy``: after a temporary failure the next attempt
waits ``min_backoff``, then twice as long each time up to ``max_backoff``;
a recipient still pending ``max_queue_lifetime`` after arrival has failed.

Every change to an envelope (``record``, ``flush``, ``delete``) is a read-
modify-write under one ``flock``, so the server's delivery threads and a
``pymailsrv queue`` command in another process never undo each other's work.
(``release`` is a single rename, and needs no lock: see ``delete``.)
Nothing here speaks SMTP; ``relay.py`` does, and reports back through
``record``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pymailsrv import schema
from pymailsrv.durable import (
    discard_file,
    exclusive_lock,
    fsync_directory,
    make_private_directory,
    private,
    write_atomically,
)
from pymailsrv.limits import (
    MAILDIR_TMP_MAX_AGE_SECONDS,
    QUEUE_MAX_BACKOFF_SECONDS,
    QUEUE_MAX_LIFETIME_SECONDS,
    QUEUE_MIN_BACKOFF_SECONDS,
)
from pymailsrv.storage import storage_error

log = logging.getLogger("pymailsrv.outqueue")

QUEUE_DIR_NAME = "queue"


class State(enum.StrEnum):
    """A recipient's state in the queue."""

    PENDING = "pending"  # not yet delivered: due now or after a temporary failure
    DELIVERED = "delivered"  # the next hop answered 250 (RFC 5321 §6.1: now its job)
    FAILED = "failed"  # a permanent failure, or it stayed pending too long


@dataclass
class Recipient:
    """One forward-path of a queued message, and what became of it so far."""

    address: str
    state: State = State.PENDING
    attempts: int = 0
    # From the last attempt: the RFC 3463 status ("4.4.1"), the diagnostic
    # as a DSN reports it ("smtp; 451 4.7.1 try again later", RFC 3464
    # §2.3.6) and the host that gave it.
    status: str | None = None
    last_error: str | None = None
    remote_mta: str | None = None
    # A failure is reported to the sender once: True once a bounce for it is queued.
    reported: bool = False
    # Seconds it had waited when the queue lifetime ran out and it failed;
    # kept apart from last_error, which is the remote's reply (RFC 3464 §2.3.6).
    gave_up_after: float | None = None


def _take(recipient: Recipient, outcome: Outcome) -> None:
    """One attempt's outcome for one recipient."""
    recipient.attempts += 1
    recipient.status = outcome.status
    recipient.remote_mta = outcome.remote_mta
    recipient.last_error = None if outcome.state is State.DELIVERED else outcome.diagnostic
    recipient.state = outcome.state


@dataclass
class QueueEntry:
    """One queued message: its envelope, as ``<id>.json`` keeps it."""

    queue_id: str
    sender: str  # the reverse-path; "" is the null path <> (never bounced)
    recipients: list[Recipient]
    created: float  # arrival time (the DSN's Arrival-Date)
    next_attempt: float
    attempts: int = 0

    @property
    def pending(self) -> list[Recipient]:
        return [recipient for recipient in self.recipients if recipient.state is State.PENDING]

    @property
    def unreported_failures(self) -> list[Recipient]:
        return [recipient for recipient in self.recipients
                if recipient.state is State.FAILED and not recipient.reported]

    @property
    def finished(self) -> bool:
        """Nothing is left to do for it: no recipient pending, every failure reported."""
        return not self.pending and not self.unreported_failures

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> "QueueEntry":
        """The entry an envelope file holds; ValueError if it is not one.

        The file may have been edited by hand, truncated or put there by
        mistake, so every field's type is checked here, once: a wrong type
        that got through would fail much later, in a delivery thread.
        """
        return schema.build(cls, json.loads(data))


# RFC 3463 §2: an enhanced status code, class.subject.detail, in ASCII digits
# with no leading zeros (a remote reply may begin with one; a bounce's Status
# field must be one).
ENHANCED_STATUS = re.compile(r"([245])\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\b")


@dataclass(frozen=True)
class Outcome:
    """What one delivery attempt did for one recipient."""

    state: State  # DELIVERED, FAILED, or PENDING for a temporary failure
    status: str  # RFC 3463 enhanced status code
    diagnostic: str  # RFC 3464 §2.3.6 diagnostic-type; text, e.g. "smtp; 550 5.1.1 no such user"
    remote_mta: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again after a temporary failure, and when to give up (Postfix's defaults)."""

    min_backoff: float = QUEUE_MIN_BACKOFF_SECONDS
    max_backoff: float = QUEUE_MAX_BACKOFF_SECONDS
    max_queue_lifetime: float = QUEUE_MAX_LIFETIME_SECONDS

    @classmethod
    def from_settings(cls, relay: object) -> "RetryPolicy":
        return cls(relay.min_backoff, relay.max_backoff, relay.max_queue_lifetime)

    def delay(self, attempts: int) -> float:
        """The wait after the ``attempts``-th attempt failed: 5, 10, 20, 40, 66.7, 66.7 ... minutes."""
        # A flush counts as an attempt, so a message may see thousands, and
        # 2.0 ** 1024 raises OverflowError. So the exponent stops at the
        # largest a float takes (1023); the product may then be inf, which
        # min() turns into max_backoff like any other large delay.
        doublings = min(max(0, attempts - 1), sys.float_info.max_exp - 1)
        return min(self.max_backoff, self.min_backoff * 2.0 ** doublings)


# Hex seconds first, so ids sort by arrival; 32 random bits make two
# messages in one second (or two processes) distinct.
QUEUE_ID_SECONDS_DIGITS = 8
QUEUE_ID_RANDOM_BYTES = 4
_QUEUE_ID = re.compile(f"[0-9A-F]{{{QUEUE_ID_SECONDS_DIGITS + 2 * QUEUE_ID_RANDOM_BYTES}}}")


def _new_queue_id() -> str:
    return f"{int(time.time()):0{QUEUE_ID_SECONDS_DIGITS}X}{secrets.token_hex(QUEUE_ID_RANDOM_BYTES).upper()}"


def is_queue_id(text: str) -> bool:
    """True if ``text`` has the form of a queue id: what a user types must never become a path."""
    return _QUEUE_ID.fullmatch(text) is not None


class OutboundQueue:
    """The queue directory of one data root."""

    def __init__(self, state_dir: Path, retry: RetryPolicy = RetryPolicy()) -> None:
        self.directory = Path(state_dir) / QUEUE_DIR_NAME
        self.retry = retry
        self._lock_path = self.directory / "lock"
        # Called after every enqueue: the relay sets it to wake its workers.
        self.wakeup: Callable[[], None] | None = None
        # Names of broken envelope files already logged (see get()).
        self._warned: set[str] = set()
        # Messages the relay in this process leaves alone for now (see
        # postpone_in_memory()), each with the time.monotonic() until when.
        self._postponed_in_memory: dict[str, float] = {}
        self._postponed_lock = threading.Lock()  # one relay thread postpones while others look
        # Envelopes as entries() last read them, each with the stamp of the
        # file it came from. The relay looks at every envelope each second;
        # parsing one costs ten times its stat (0.1 ms against 0.01).
        self._read: dict[str, tuple[tuple[int, int, int], QueueEntry]] = {}

    def _ensure_directories(self) -> None:
        make_private_directory(self.directory)
        make_private_directory(self.directory / "tmp")

    def message_path(self, queue_id: str) -> Path:
        return self.directory / f"{queue_id}.msg"

    def _envelope_path(self, queue_id: str) -> Path:
        return self.directory / f"{queue_id}.json"

    def _held_envelope_path(self, queue_id: str) -> Path:
        return self.directory / "tmp" / f"{queue_id}.json"

    # --- putting mail in ---------------------------------------------------------

    def receive(self) -> "IncomingQueueMessage":
        """Start receiving a message as it streams in (see IncomingQueueMessage)."""
        return IncomingQueueMessage(self)

    def enqueue(self, sender: str, recipients: Iterable[str], message: bytes, now: float | None = None,
                held: bool = False) -> str:
        """Queue a whole message (LF or CRLF line ends) for ``recipients``;
        returns its id once it is durable. ``held``: see IncomingQueueMessage.commit."""
        recipients = _at_least_one(recipients)
        incoming = self.receive()
        try:
            incoming.write(message)
            return incoming.commit(sender, recipients, now, held)
        except BaseException:
            incoming.discard()
            raise

    def _commit_envelope(self, queue_id: str, sender: str, recipients: list[str], now: float | None,
                         held: bool = False) -> None:
        now = time.time() if now is None else now
        entry = QueueEntry(queue_id, sender, [Recipient(address) for address in recipients],
                           created=now, next_attempt=now)
        if held:
            # Into tmp/, which no listing reads: no relay thread, in this
            # process or another, sees the message before release().
            write_atomically(self._held_envelope_path(queue_id), entry.to_json())
            log.info("held %s from <%s> to %s", queue_id, sender, ", ".join(recipients))
            return
        # write_atomically fsyncs the directory after the rename, which makes
        # the .msg's name durable too: it lives in the same directory.
        write_atomically(self._envelope_path(queue_id), entry.to_json())
        log.info("queued %s from <%s> to %s", queue_id, sender, ", ".join(recipients))
        if self.wakeup is not None:
            self.wakeup()

    def release(self, queue_id: str) -> None:
        """Queue a message committed ``held``, and wake the relay for it; raises StorageError.

        This is the held message's commit point: its envelope is renamed from
        ``tmp/`` into the queue directory, and the directory is fsynced, which
        makes the ``.msg``'s name durable too. The client hears 250 next, so
        the message must survive a crash from here on (RFC 5321 §6.1).
        """
        try:
            os.rename(self._held_envelope_path(queue_id), self._envelope_path(queue_id))
            try:
                fsync_directory(self.directory)
            except OSError:
                self.take_back(queue_id)  # the client hears 451 and sends again: no copy may go now
                raise
        except OSError as error:
            raise storage_error(error, "releasing the queued message") from error
        log.info("queued %s (released)", queue_id)
        if self.wakeup is not None:
            self.wakeup()

    def postpone_in_memory(self, queue_id: str, until: float) -> None:
        """Keep a message out of ``due()`` in this process until the monotonic time ``until``.

        For the relay, after an attempt that raised before its outcome was
        written down. ``postpone`` cannot serve there: the failure may be
        the disk itself (ENOSPC while recording), and then the envelope's
        next_attempt cannot be written either, so the message would be due
        again at once. This process is the one that runs the relay threads,
        the only callers of ``due()``, so its memory is enough; after a
        restart the message is simply due.
        """
        with self._postponed_lock:
            self._postponed_in_memory[queue_id] = until

    def _still_postponed_in_memory(self) -> set[str]:
        now = time.monotonic()
        with self._postponed_lock:
            self._postponed_in_memory = {queue_id: until for queue_id, until
                                         in self._postponed_in_memory.items() if until > now}
            return set(self._postponed_in_memory)

    # --- reading ---------------------------------------------------------------

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(name[:-5] for name in names if name.endswith(".json"))

    def get(self, queue_id: str) -> QueueEntry | None:
        """The entry, or None if it is not (or no longer) queued or cannot be read.

        A broken entry (a directory named ``x.json``, a file that is not an
        envelope, one whose id is not its file name) is skipped, never
        raised: it must not stop the delivery threads or ``queue list``.
        It stays where it is for a person to look at.
        """
        path = self._envelope_path(queue_id)
        try:
            entry = QueueEntry.from_json(path.read_bytes())
            if entry.queue_id != queue_id:
                # Else the relay would claim an id that get() never finds, again and again.
                raise ValueError(f"it says it is {entry.queue_id!r}")
        except FileNotFoundError:
            return None  # delivered or deleted meanwhile
        except (OSError, ValueError, RecursionError) as error:  # RecursionError: JSON nested too deep
            self._warn_broken(path, error)
            return None
        self._warned.discard(path.name)
        return entry

    def _warn_broken(self, path: Path, error: Exception) -> None:
        """Log a broken entry once, not at every look into the queue (once a second)."""
        if path.name not in self._warned:
            self._warned.add(path.name)
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error  # the path once
            log.warning("%s is not a readable queue entry, skipped (move it away to silence this): %s",
                        path, reason)

    def entries(self) -> list[QueueEntry]:
        """Every readable entry, for reading only: an envelope not changed
        since the last look is not parsed again (``get`` always reads afresh)."""
        last_read, read, found = self._read, {}, []
        for queue_id in self.ids():
            try:
                status = self._envelope_path(queue_id).stat()
            except FileNotFoundError:
                continue  # delivered or deleted meanwhile
            except OSError:
                status = None  # get() says what is wrong with it
            # Every change renames a new file over the old (write_atomically):
            # a new inode, whatever the clock's resolution.
            stamp = (status.st_mtime_ns, status.st_size, status.st_ino) if status else None
            if queue_id in last_read and last_read[queue_id][0] == stamp:
                entry = last_read[queue_id][1]
            elif (entry := self.get(queue_id)) is None:
                continue
            if stamp is not None:
                read[queue_id] = (stamp, entry)
            found.append(entry)
        self._read = read
        return found

    def due(self, now: float | None = None) -> list[QueueEntry]:
        """Entries with work to do now, the longest-waiting first.

        A finished entry is due at once, to be removed: one is left only by
        a crash between its last change and its removal.
        """
        now = time.time() if now is None else now
        postponed = self._still_postponed_in_memory()
        due = [entry for entry in self.entries()
               if (entry.finished or entry.next_attempt <= now) and entry.queue_id not in postponed]
        return sorted(due, key=lambda entry: entry.next_attempt)

    # --- changing ----------------------------------------------------------------

    def _update(self, queue_id: str, change: Callable[[QueueEntry], None]) -> QueueEntry | None:
        """Read, change and rewrite one envelope under the queue lock; None if it is gone."""
        self._ensure_directories()
        with exclusive_lock(self._lock_path):
            entry = self.get(queue_id)
            if entry is None:
                return None
            change(entry)
            write_atomically(self._envelope_path(queue_id), entry.to_json())
            return entry

    def record(self, queue_id: str, outcomes: dict[str, Outcome], now: float | None = None) -> QueueEntry | None:
        """Write down one delivery attempt's outcomes and schedule the next attempt.

        ``outcomes`` maps recipient addresses to what happened; recipients
        not in it (or no longer pending: see ``settle``) were not tried. A
        temporary failure past the queue lifetime is a failure: the message
        has waited long enough. The next attempt comes no later than that
        lifetime's end, so the sender hears of it then, not a backoff later.
        """
        now = time.time() if now is None else now

        def change(entry: QueueEntry) -> None:
            entry.attempts += 1
            expired = now - entry.created >= self.retry.max_queue_lifetime
            for recipient in entry.pending:
                outcome = outcomes.get(recipient.address)
                if outcome is None:
                    continue
                _take(recipient, outcome)
                if outcome.state is State.PENDING and expired:
                    # RFC 3463 X.4.7 is "delivery time expired", but it also
                    # says to report "the code for the actual problem" when
                    # known, so the last status stays, class and all: RFC
                    # 3464 §2.3.3 lets Action: failed carry a 4.x.x status.
                    recipient.gave_up_after = now - entry.created
                    recipient.state = State.FAILED
            if entry.pending:
                entry.next_attempt = min(now + self.retry.delay(entry.attempts),
                                         entry.created + self.retry.max_queue_lifetime)

        return self._update(queue_id, change)

    def settle(self, queue_id: str, outcomes: dict[str, Outcome]) -> QueueEntry | None:
        """Write down, in the middle of an attempt, the recipients it has
        finished with (delivered or failed); ``record`` still ends the attempt.

        An attempt sends to one host after another: a crash or a stop
        between two must not send again to those already done.
        """
        def change(entry: QueueEntry) -> None:
            for recipient in entry.pending:
                outcome = outcomes.get(recipient.address)
                if outcome is not None and outcome.state is not State.PENDING:
                    _take(recipient, outcome)

        return self._update(queue_id, change)

    def mark_reported(self, queue_id: str, addresses: Iterable[str]) -> QueueEntry | None:
        """Remember that the failures of ``addresses`` have been reported (or need not be)."""
        addresses = set(addresses)

        def change(entry: QueueEntry) -> None:
            for recipient in entry.recipients:
                if recipient.address in addresses:
                    recipient.reported = True

        return self._update(queue_id, change)

    def postpone(self, queue_id: str, until: float) -> QueueEntry | None:
        """Leave a message alone until ``until`` at least (after a failure of
        our own); a later next attempt, its recipients' backoff, stays."""

        def change(entry: QueueEntry) -> None:
            entry.next_attempt = max(entry.next_attempt, until)

        return self._update(queue_id, change)

    def flush(self, now: float | None = None) -> int:
        """Make every message with pending recipients due now; returns how many."""
        now = time.time() if now is None else now
        flushed = 0
        for queue_id in self.ids():
            def change(entry: QueueEntry) -> None:
                entry.next_attempt = min(entry.next_attempt, now)
            entry = self._update(queue_id, change)
            flushed += entry is not None and bool(entry.pending)
        if self.wakeup is not None:
            self.wakeup()
        return flushed

    def take_back(self, queue_id: str) -> None:
        """Undo an enqueue that failed part way, or a held one whose message
        is not to go (the local delivery beside it failed): no envelope and
        no message stay.

        The envelope may be in place already (renamed, but the directory's
        fsync failed): the client is told 451 and sends again, so it must
        not go out as well. An error here is not raised: the caller's
        first one is what the client hears about.
        """
        with contextlib.suppress(OSError):
            if not self.delete(queue_id):
                self.message_path(queue_id).unlink(missing_ok=True)

    def delete(self, queue_id: str) -> bool:
        """Remove a message from the queue, or a held one (never released); False if neither is there."""
        # Held first, then queued: the way release() moves an envelope, so
        # one released meanwhile is still found, with no lock in release().
        held, queued = self._held_envelope_path(queue_id), self._envelope_path(queue_id)
        if not (held.exists() or queued.exists()):
            return False
        with exclusive_lock(self._lock_path):
            # The envelope first: a crash between the two leaves a
            # stale .msg, never an envelope without its message. Both
            # envelopes, if a crash in release() left the two.
            held_removed, queued_removed = _unlink_if_there(held), _unlink_if_there(queued)
            if not (held_removed or queued_removed):
                return False
            self.message_path(queue_id).unlink(missing_ok=True)
            fsync_directory(self.directory)
        with self._postponed_lock:
            self._postponed_in_memory.pop(queue_id, None)
        log.info("removed %s from the queue" if queued_removed else "took back held %s", queue_id)
        return True

    def remove_stale_files(self, now: float | None = None) -> int:
        """Remove what crashes left: old tmp/ files, .msg files without an
        envelope, and envelopes' new versions never renamed (``.json.tmp``).

        That includes a held message never released: its envelope in tmp/
        and its .msg, which has no envelope beside it. Old means older than
        Maildir's 36 hours for tmp/: far longer than any enqueue (or hold)
        takes, so one in progress (in another process) is never hit.
        """
        cutoff = (time.time() if now is None else now) - MAILDIR_TMP_MAX_AGE_SECONDS
        removed = 0
        queued = set(self.ids())
        candidates = [path for path in self.directory.glob("*.msg") if path.stem not in queued]
        candidates += list((self.directory / "tmp").glob("*")) + list(self.directory.glob("*.json.tmp"))
        for path in candidates:
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as error:  # e.g. a directory someone put there: theirs to remove
                log.warning("cannot remove stale %s: %s", path, error.strerror or error)
        return removed


class IncomingQueueMessage:
    """One message being written into ``queue/tmp/`` as it arrives.

    The queue's twin of ``maildir.IncomingMaildirMessage``: ``write`` as the
    text comes in, then ``commit(sender, recipients)`` makes it durable and
    queued and returns its id, or ``discard`` throws it away. Both leave
    nothing in ``tmp/``. Errors are ``StorageError``s.
    """

    def __init__(self, queue: OutboundQueue) -> None:
        self._queue = queue
        try:
            queue._ensure_directories()
        except OSError as error:
            raise storage_error(error, "creating the queue directory") from error
        while True:
            self.queue_id = _new_queue_id()
            self._tmp_path = queue.directory / "tmp" / self.queue_id
            try:
                self._file: BinaryIO = open(self._tmp_path, "xb", opener=private)
                break
            except FileExistsError:
                continue
            except OSError as error:
                raise storage_error(error, "creating a file in queue/tmp/") from error
        self.octets = 0

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as error:
            raise storage_error(error, "writing into queue/tmp/") from error
        self.octets += len(data)

    def commit(self, sender: str, recipients: Iterable[str], now: float | None = None, held: bool = False) -> str:
        """Queue the message and return its id.

        With ``held`` the message is written and fsynced but not yet
        queued: its envelope waits in ``tmp/``, on disk, so no process's
        relay sees it, until ``OutboundQueue.release`` queues it or
        ``OutboundQueue.delete`` takes it back. One never released (a crash,
        a failed local delivery) is never sent; ``remove_stale_files``
        clears it.
        """
        recipients = _at_least_one(recipients)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.rename(self._tmp_path, self._queue.message_path(self.queue_id))
            self._queue._commit_envelope(self.queue_id, sender, recipients, now, held)
        except OSError as error:
            self.discard()
            self._queue.take_back(self.queue_id)
            raise storage_error(error, "queueing the message") from error
        return self.queue_id

    def discard(self) -> None:
        discard_file(self._file, self._tmp_path)


def _unlink_if_there(path: Path) -> bool:
    """Remove ``path``; False if it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _at_least_one(recipients: Iterable[str]) -> list[str]:
    recipients = list(recipients)
    if not recipients:
        raise ValueError("a queued message needs at least one recipient")
    return recipients


def format_duration(seconds: float) -> str:
    """A short human duration: 42s, 5m, 3h, 5d."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
