"""A table of fixed-size records in memory shared by forked processes.

The worker processes of ``start --processes N`` (workers.py) must count
some things together: the open connections under the caps (server.py),
the failed logins per address (auth.py) and the sessions, whose numbers
name them in logs and transcripts (``SharedCounter``). ``SharedRecords`` is
the one mechanism under all three: a fixed number of records of one
``struct`` layout, in a memory-mapped file that every process forked after
it was made sees (MAP_SHARED), read and written under one lock.

The lock is two: a thread lock for the threads of one process, then a
``lockf`` lock on the file for the processes. A POSIX record lock belongs
to its process, so the kernel drops it if the holder dies - a worker killed
with -9 never leaves the others waiting. It is also why the thread lock is
one for every table of a process: were one thread to hold the caps' file
lock while another waited for the counter's, the kernel would see the
process holding one lock and waiting for a second - against a process
doing the opposite, a deadlock - and refuse with EDEADLK, though no thread
ever holds two. One thread per process at a time holds or waits, so no
process ever does both. The file has no name: a memfd on
Linux, elsewhere a temporary file unlinked at once. Nothing is left on
disk, and the server needs no writable directory for it.

A client address is kept as a 64-bit digest (``address_key``), so records
have a fixed size whatever the address. The digest is keyed with a secret
made when this module loads, before any worker is forked, so every process
of one server agrees on it and no client can work it out: knowing where
each address goes, a client could pick addresses whose records crowd its
own out of the table, and then its failed logins would go uncounted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import mmap
import os
import secrets
import struct
import tempfile
import threading
import weakref
from collections.abc import Iterator
from typing import BinaryIO

from pymailsrv.limits import CLIENT_IPV6_PREFIX
from pymailsrv.paths import unmapped

# address_key never gives it: a record whose key is 0 is free.
FREE = 0


_ADDRESS_KEY_SECRET = secrets.token_bytes(32)  # a 256-bit key for blake2b


def client_key(address: str) -> int:
    """One client's key: its IPv4 address (also as ``::ffff:a.b.c.d``), or
    its IPv6 address's /48 (CLIENT_IPV6_PREFIX)."""
    ip = unmapped(ipaddress.ip_address(address))
    if ip.version == 6:
        return address_key(str(ipaddress.ip_network(f"{ip}/{CLIENT_IPV6_PREFIX}", strict=False)))
    return address_key(str(ip))


def address_key(address: str) -> int:
    """A client address as a 64-bit number, never FREE (two addresses alike: 1 in 2**64)."""
    digest = hashlib.blake2b(address.encode(), digest_size=8, key=_ADDRESS_KEY_SECRET).digest()
    return int.from_bytes(digest, "big") or 1


# The thread lock of every SharedRecords in this process (see above).
_ONE_TABLE_AT_A_TIME = threading.Lock()


def _anonymous_file() -> BinaryIO:
    if hasattr(os, "memfd_create"):
        return os.fdopen(os.memfd_create("pymailsrv-shared"), "w+b")
    return tempfile.TemporaryFile()


class SharedRecords:
    """``count`` records of ``layout``, all zero at first, shared with forked processes."""

    def __init__(self, layout: struct.Struct, count: int) -> None:
        self._layout = layout
        self._file = _anonymous_file()
        self._file.truncate(count * layout.size)
        self._memory = mmap.mmap(self._file.fileno(), count * layout.size)  # MAP_SHARED
        # The file goes with the table, closed, not left to warn (ResourceWarning)
        # in a test suite that starts many servers (testing.py) and takes
        # warnings for errors. Forked workers keep their own copies open.
        weakref.finalize(self, self._file.close)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lock for the block: read and write records only inside one,
        and never hold two tables' locks at once (the thread lock is one for all)."""
        with _ONE_TABLE_AT_A_TIME:
            fcntl.lockf(self._file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self._file, fcntl.LOCK_UN)

    def read(self, index: int) -> tuple:
        return self._layout.unpack_from(self._memory, index * self._layout.size)

    def read_all(self) -> list[tuple]:
        return list(self._layout.iter_unpack(self._memory))

    def write(self, index: int, *values: int | float) -> None:
        self._layout.pack_into(self._memory, index * self._layout.size, *values)


class SharedCounter:
    """A count shared by forked processes: ``next()`` never gives a number twice."""

    def __init__(self) -> None:
        self._records = SharedRecords(struct.Struct("=q"), 1)

    def next(self) -> int:
        with self._records.locked():
            (last,) = self._records.read(0)
            self._records.write(0, last + 1)
            return last + 1
