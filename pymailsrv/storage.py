"""The storage vocabulary the protocol sessions know, and nothing more.

A session never sees a path. POP3 gets a ``Maildrop`` (RFC 1939's word for a
user's mailbox; here, the one a session holds locked); SMTP gets an
``IncomingMessage`` to write a message into as it streams in. ``maildir.py``
implements both on Maildir folders (``MaildirStore``, which keeps the
``MailStore`` promises below), ``outqueue.py`` the second for mail going
elsewhere; anything else that keeps these promises could stand in their place.
"""

from __future__ import annotations

import errno

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol


class StorageError(Exception):
    """The store could not do what was asked; the session answers a temporary failure."""


class MaildropLocked(StorageError):
    """Another session holds the maildrop (RFC 1939 §4)."""


class MessageVanished(StorageError):
    """The message was removed underneath the session (by another program)."""


class MessageUnreadable(StorageError):
    """The message is there, but the server may not read it (a file another
    program left with permissions that shut us out): only its owner can mend it."""


class InsufficientStorage(StorageError):
    """The disk is full (ENOSPC, EDQUOT): RFC 3463 X.3.1."""


_FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def storage_error(error: OSError, doing: str) -> StorageError:
    """The StorageError for an OSError met while ``doing`` something (a full disk is its own kind).

    Its text names the file where the OSError does: the admin reading the
    log must find it (the SMTP client hears only 451 or 452).
    """
    where = f"{error.filename}: " if error.filename else ""
    if error.errno in _FULL_DISK_ERRNOS:
        return InsufficientStorage(f"{doing}: {where}{error.strerror}")
    return StorageError(f"{doing}: {where}{error.strerror or error}")


@dataclass(frozen=True)
class MessageInfo:
    """One message as a POP3 session's snapshot holds it."""

    key: str  # the store's name for it, stable for the life of the message
    size: int  # octets exactly as POP3 sends it: CRLF line ends (RFC 1939 §11)
    uid: str  # the UIDL unique-id (RFC 1939 §7), stable across sessions
    seen: bool = False  # retrieved before, in an earlier session or by another mail reader


class Maildrop(Protocol):
    """A user's mailbox, held exclusively by one POP3 session."""

    def snapshot(self) -> list[MessageInfo]:
        """The messages present at login, in arrival order (msg_number - 1 = index)."""

    def text(self, key: str) -> Iterator[bytes]:
        """The message with CRLF line ends, in blocks of whole lines (raises MessageVanished,
        MessageUnreadable)."""

    def mark_seen(self, key: str) -> None:
        """Remember that the user has read the message."""

    def expunge(self, keys: Iterable[str]) -> int:
        """Remove these messages for good; returns how many could not be removed."""

    def release(self) -> None:
        """Give up the maildrop lock."""


class IncomingMessage(Protocol):
    """A message being received, written to disk as it arrives.

    Each store commits it its own way (``commit()`` into Maildirs,
    ``commit(sender, recipients)`` into the outbound queue); until then it
    can be written to or thrown away, and it already has its id.
    """

    queue_id: str

    def write(self, data: bytes) -> None: ...

    def discard(self) -> None: ...


class MailStore(Protocol):
    """What the sessions may ask of the mailboxes."""

    def open_maildrop(self, user: str) -> Maildrop:
        """Lock a user's maildrop for a POP3 session (raises MaildropLocked)."""

    def receive(self, users: Iterable[str]) -> IncomingMessage:
        """Start receiving one message for these local users."""
