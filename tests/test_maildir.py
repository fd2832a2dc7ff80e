"""The Maildir store on a real disk: durable delivery, reading, stale files.

Delivery must follow the Maildir spec (tmp/ -> fsync -> new/ -> fsync the
directory), leave nothing in tmp/, and be all-or-none for several users.
Reading must skip what is not a message and survive files that vanish.
"""

from __future__ import annotations

import errno
import io
import mailbox
import logging
import os
import re
import shutil
import stat
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymailsrv import maildir as maildir_module
from pymailsrv import replies as R
from pymailsrv.durable import write_atomically
from pymailsrv.limits import MAILDIR_TMP_MAX_AGE_SECONDS
from pymailsrv.maildir import READ_BLOCK_OCTETS, MaildirStore, pop3_size, pop3_text, uid_of
from pymailsrv.outqueue import OutboundQueue
from pymailsrv.storage import InsufficientStorage, MessageVanished, StorageError, storage_error
from pymailsrv.users import UserError

MESSAGE = b"Subject: hi\n\nhello\n"
UNIQUE_NAME = re.compile(r"(\d+)\.M(\d{6})P(\d+)Q(\d+)R([0-9A-F]{10})\.([^,/:]+),S=(\d+),W=(\d+)")


def listing(path: Path) -> list[str]:
    return sorted(entry.name for entry in path.iterdir())


# --- delivery ------------------------------------------------------------------------


def test_delivery_writes_new_with_unique_name_and_sizes(store, root):
    queue_id = store.deliver("alice", MESSAGE)
    (name,) = listing(root / "alice" / "new")
    match = UNIQUE_NAME.fullmatch(name)
    assert match, name
    seconds, _micro, pid, _counter, random_part, _host, disk, crlf = match.groups()
    assert abs(int(seconds) - time.time()) < 60
    assert int(pid) == os.getpid()
    assert random_part == queue_id
    assert int(disk) == len(MESSAGE) == (root / "alice" / "new" / name).stat().st_size
    assert int(crlf) == len(MESSAGE.replace(b"\n", b"\r\n"))
    assert listing(root / "alice" / "tmp") == [] and listing(root / "alice" / "cur") == []


def test_delivery_stores_lf_line_ends_and_adds_a_final_newline(store, root):
    store.deliver("alice", b"Subject: crlf\r\n\r\nno final newline")
    (path,) = (root / "alice" / "new").iterdir()
    assert path.read_bytes() == b"Subject: crlf\n\nno final newline\n"
    assert path.name.endswith(",S=32,W=35")


@pytest.mark.parametrize("text, stored", [
    (b"a" * (READ_BLOCK_OCTETS - 1) + b"\r\nnext\r\n", b"a" * (READ_BLOCK_OCTETS - 1) + b"\nnext\n"),
    (b"a" * (READ_BLOCK_OCTETS - 1) + b"\r", b"a" * (READ_BLOCK_OCTETS - 1) + b"\r\n"),  # a bare CR last
    (b"a" * READ_BLOCK_OCTETS, b"a" * READ_BLOCK_OCTETS + b"\n"),
    (b"", b""),
], ids=["CRLF split between two reads", "a bare CR at the end", "no line end", "nothing"])
def test_a_message_read_from_a_file_is_stored_as_the_same_bytes_would_be(store, root, text, stored):
    # 'pymailsrv deliver' streams stdin a block at a time: a CRLF may fall
    # across two reads, and it must still be one line end.
    store.create_maildir("alice")
    store.deliver("alice", io.BytesIO(text))
    store.deliver("alice", text)
    assert [path.read_bytes() for path in (root / "alice" / "new").iterdir()] == [stored, stored]


def test_every_delivery_gets_its_own_name(store, root):
    ids = {store.deliver("alice", MESSAGE) for _ in range(20)}
    assert len(ids) == 20
    assert len(listing(root / "alice" / "new")) == 20


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """The paths fsynced from now on, in order (the fsyncs still happen)."""
    paths: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(maildir_module.os, "fsync", recording_fsync)
    return paths


def test_delivery_fsyncs_the_file_and_the_new_directory(store, root, synced):
    store.create_maildir("alice")
    synced.clear()  # making the Maildir fsyncs too: only the delivery's count here
    store.deliver("alice", MESSAGE)
    (name,) = listing(root / "alice" / "new")
    tmp_file = str(root / "alice" / "tmp" / name.split(",")[0])
    # The file is synced while still in tmp/, then the directory it was linked into.
    assert synced == [tmp_file, str(root / "alice" / "new")]


def test_delivered_mail_is_readable_by_python_mailbox(store, root):
    store.deliver("alice", b"Subject: stdlib\n\nbody\n")
    box = mailbox.Maildir(root / "alice", create=False)
    (message,) = box.values()
    assert message["Subject"] == "stdlib"
    assert message.get_subdir() == "new"


def test_one_message_for_several_users_is_in_every_maildir(store, root):
    incoming = store.receive(["alice", "bob"])
    incoming.write(MESSAGE)
    incoming.commit()
    (alice_name,) = listing(root / "alice" / "new")
    assert listing(root / "bob" / "new") == [alice_name]
    assert (root / "bob" / "new" / alice_name).stat().st_nlink == 2  # written once, linked twice
    assert listing(root / "alice" / "tmp") == [] and listing(root / "bob" / "tmp") == []


def written_for_alice_and_bob(store):
    """A message for alice and bob, written into tmp/, not yet committed."""
    store.create_maildir("alice")
    store.create_maildir("bob")
    incoming = store.receive(["alice", "bob"])
    incoming.write(MESSAGE)
    return incoming


def test_delivery_to_several_users_is_all_or_none(store, root):
    incoming = written_for_alice_and_bob(store)
    # bob's new/ turns into a file before the commit: linking there fails.
    (root / "bob" / "new").rmdir()
    (root / "bob" / "new").write_bytes(b"")
    with pytest.raises(StorageError):
        incoming.commit()
    assert listing(root / "alice" / "new") == []
    assert listing(root / "alice" / "tmp") == []


def test_a_delivery_taken_back_leaves_no_copy_that_a_login_moved_meanwhile(store, root, monkeypatch):
    # bob logs in between his link and alice's rename: his snapshot moves the
    # entry to cur/, where the take-back used to miss it, so bob kept a
    # message the client was told had failed, and would send again.
    incoming = written_for_alice_and_bob(store)
    real_link = os.link

    def link_then_bob_logs_in(source, target):
        real_link(source, target)
        maildrop = store.open_maildrop("bob")
        assert len(maildrop.snapshot()) == 1
        maildrop.release()

    monkeypatch.setattr(os, "link", link_then_bob_logs_in)
    (root / "alice" / "new").rmdir()
    (root / "alice" / "new").write_bytes(b"")  # alice's rename, after bob's link, fails
    with pytest.raises(StorageError):
        incoming.commit()
    assert [listing(root / "bob" / folder) for folder in ("new", "cur")] == [[], []]
    assert listing(root / "alice" / "tmp") == []


def test_a_delivery_interrupted_after_its_links_is_taken_back(store, root, monkeypatch):
    # Ctrl-C in `pymailsrv deliver` between bob's link and alice's rename:
    # only an OSError was taken back, so bob kept a message never delivered.
    incoming = written_for_alice_and_bob(store)

    def interrupted(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        incoming.commit()
    assert [listing(root / user / folder) for user in ("alice", "bob") for folder in ("tmp", "new")] == [[]] * 4


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_lock_that_fails_for_another_reason_keeps_no_descriptor_open(store, monkeypatch):
    # Only "held by another session" closed the lock file's descriptor.
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")  # as on some network file systems

    store.create_maildir("alice")
    monkeypatch.setattr(maildir_module.fcntl, "flock", no_locks)
    before = open_descriptors()
    with pytest.raises(OSError, match="No locks available"):
        store.open_maildrop("alice")
    assert open_descriptors() == before


def test_a_file_written_atomically_keeps_no_descriptor_open_when_its_mode_cannot_be_set(tmp_path, monkeypatch):
    def refused(fd, mode):
        raise PermissionError(errno.EPERM, "Operation not permitted")  # as on vfat

    monkeypatch.setattr(os, "fchmod", refused)
    before = open_descriptors()
    with pytest.raises(PermissionError):
        write_atomically(tmp_path / "users.json", b"{}")
    assert open_descriptors() == before
    assert list(tmp_path.iterdir()) == []


def test_one_user_named_twice_gets_the_message_once(store, root):
    incoming = store.receive(["alice", "ALICE"])
    incoming.write(MESSAGE)
    incoming.commit()
    assert len(listing(root / "alice" / "new")) == 1
    assert listing(root / "alice" / "tmp") == []


@pytest.mark.parametrize("removed", ["", "new", "tmp"], ids=["whole-maildir", "new", "tmp"])
@pytest.mark.parametrize("position", [0, 1], ids=["first-recipient", "second-recipient"])
def test_delivery_makes_again_a_maildir_removed_by_hand(store, root, removed, position):
    # user add makes one; a delivery remakes one removed, or half removed, by hand.
    store.create_maildir("alice")
    store.create_maildir("bob")
    shutil.rmtree(root / "alice" / removed)
    users = ["bob"]
    users.insert(position, "alice")
    incoming = store.receive(users)
    incoming.write(MESSAGE)
    incoming.commit()
    assert len(listing(root / "alice" / "new")) == len(listing(root / "bob" / "new")) == 1
    # What the delivery needs is made: new/ always, tmp/ where the file is written.
    expected = ["cur", "new", "tmp"] if removed != "tmp" or position == 0 else ["cur", "new"]
    assert sorted(path.name for path in (root / "alice").iterdir()) == expected


def test_a_maildir_made_by_a_delivery_is_fsynced_with_its_parent(store, root, synced):
    store.deliver("alice", MESSAGE)
    assert synced[:2] == [str(root / "alice"), str(root)]


def test_mail_is_its_owners_alone_to_read_whatever_the_umask(store, root):
    # With the usual umask of 022, messages were 0644 and Maildirs 0755:
    # every local account could read everyone's mail.
    old_umask = os.umask(0o022)
    try:
        store.deliver("alice", MESSAGE)
        queue = OutboundQueue(root / ".pymailsrv")
        queue_id = queue.enqueue("bob@example.org", ["carol@example.net"], MESSAGE)
    finally:
        os.umask(old_umask)
    (message,) = (root / "alice" / "new").iterdir()
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in [
        message, root / "alice", *(root / "alice" / subdir for subdir in ("tmp", "new", "cur")),
        queue.message_path(queue_id), queue.directory, queue.directory / "tmp"]}
    assert modes == {path: 0o600 if path.is_file() else 0o700 for path in modes}


def test_discarded_message_leaves_nothing(store, root):
    incoming = store.receive(["alice"])
    incoming.write(MESSAGE)
    incoming.discard()
    assert listing(root / "alice" / "tmp") == [] and listing(root / "alice" / "new") == []


def test_a_discard_that_cannot_remove_its_file_says_so_and_raises_nothing(store, root, caplog):
    # A discard runs where something already failed, or as a session ends:
    # a file it cannot remove (here tmp/ is no longer a directory; a disk
    # gone read-only is the real case) is left to the stale-file sweep.
    incoming = store.receive(["alice"])
    incoming.write(MESSAGE)
    (root / "alice" / "tmp").rename(root / "alice" / "tmp-moved")
    (root / "alice" / "tmp").write_bytes(b"")
    incoming.discard()
    [warning] = [record.getMessage() for record in caplog.records if record.name == "pymailsrv.durable"]
    assert re.fullmatch(r"cannot remove .*/alice/tmp/[^/]+: Not a directory; the stale-file sweep will", warning)


def test_receive_refuses_invalid_user_names_creating_nothing(store, root):
    for name in ("../escape", ".pymailsrv", "a/b"):
        with pytest.raises(UserError):
            store.receive([name])
    with pytest.raises(ValueError):
        store.receive([])
    assert listing(root) == []


def test_a_broken_tmp_directory_fails_delivery_cleanly(store, root):
    store.create_maildir("alice")
    (root / "alice" / "tmp").rmdir()
    (root / "alice" / "tmp").symlink_to(root / "nowhere")  # a dangling tmp/
    with pytest.raises(StorageError):
        store.deliver("alice", MESSAGE)
    assert listing(root / "alice" / "new") == []


def test_a_full_disk_is_reported_as_insufficient_storage():
    error = storage_error(OSError(errno.ENOSPC, "No space left on device"), "writing")
    assert isinstance(error, InsufficientStorage)
    assert not isinstance(storage_error(OSError(errno.EIO, "I/O"), "x"), InsufficientStorage)


# --- reading -----------------------------------------------------------------------


def test_listing_ignores_what_is_not_a_message(store, root):
    store.deliver("alice", MESSAGE)
    new = root / "alice" / "new"
    (new / ".hidden").write_bytes(MESSAGE)
    (new / "subdirectory").mkdir()
    (new / "dangling").symlink_to(root / "nowhere")
    (root / "alice" / "cur" / ".tmp-of-a-reader").write_bytes(MESSAGE)
    (info, _path), = store.messages("alice")
    assert info.size == 22
    drop = store.open_maildrop("alice")
    try:
        assert [message.key for message in drop.snapshot()] == [info.key]
    finally:
        drop.release()
    assert (new / ".hidden").exists() and (new / "subdirectory").is_dir()


def test_snapshot_is_in_arrival_order_and_sizes_files_without_w(store, root):
    cur = root / "alice" / "cur"
    store.create_maildir("alice")
    (cur / "1000000002.b.example:2,").write_bytes(b"B\n")
    (cur / "1000000001.a.example:2,S").write_bytes(b"A\r\nline\r\n")
    (cur / "999999999.z.example:2,").write_bytes(b"no newline")
    drop = store.open_maildrop("alice")
    try:
        snapshot = drop.snapshot()
    finally:
        drop.release()
    assert [message.uid for message in snapshot] == ["999999999.z.example", "1000000001.a.example",
                                                     "1000000002.b.example"]
    assert [message.size for message in snapshot] == [12, 9, 3]


@pytest.mark.parametrize("names", [
    ["cur/1700000005.dup.example:2,S", "new/1700000005.dup.example"],  # the move to cur/ would replace one
    ["cur/1700000005.dup.example:2,S", "new/1700000005.dup.example:2,"],
    ["new/1700000006.col.example:1,a", "new/1700000006.col.example:1,b"],  # one key twice
    ["new/1700000007.cm.example,X=1", "new/1700000007.cm.example,X=2"],  # one UIDL twice
    # Keys that differ, names that do not: the cur/ copy's ",S=" fields
    # must not let the new/ copy, without them, take its UIDL.
    ["cur/1700000005.dup.example,S=22,W=25:2,S", "new/1700000005.dup.example"],
], ids=["new-over-cur", "new-with-info-over-cur", "one-key", "one-uidl", "new-without-fields-over-cur"])
def test_two_files_with_one_unique_name_are_both_kept_and_told_apart(store, root, names, caplog):
    store.create_maildir("alice")
    copies = {b"Subject: copy %d\n\nbody\n" % number for number in range(len(names))}
    for name, copy in zip(names, sorted(copies)):
        (root / "alice" / name).write_bytes(copy)
    drop = store.open_maildrop("alice")
    try:
        snapshot = drop.snapshot()
        served = {message.key: b"".join(drop.text(message.key)) for message in snapshot}
    finally:
        drop.release()
    assert len(served) == len({message.uid for message in snapshot}) == 2
    if names[0].startswith("cur/"):  # the message a session has shown keeps its UIDL
        kept = next(message for message in snapshot if message.uid == "1700000005.dup.example")
        assert served[kept.key] == b"Subject: copy 0\r\n\r\nbody\r\n"
    assert {text.replace(b"\r\n", b"\n") for text in served.values()} == copies
    assert all(message.size == len(served[message.key]) for message in snapshot)
    assert {path.read_bytes() for path in (root / "alice" / "cur").iterdir()} == copies
    assert "has the unique name of another message: renamed to cur/" in caplog.text


@pytest.mark.parametrize("name", ["²³.odd.example", "1700000000.odd.example,S=2,W=²", "9" * 30 + ".odd.example"])
def test_a_name_with_digits_int_refuses_is_listed_not_crashed_on(store, root, name):
    # Another program's choice: str.isdigit() takes "²", which int() refuses.
    store.create_maildir("alice")
    (root / "alice" / "new" / name).write_bytes(b"Subject: odd\n\nx\n")
    drop = store.open_maildrop("alice")
    try:
        (message,) = drop.snapshot()
    finally:
        drop.release()
    assert message.size == len(b"Subject: odd\r\n\r\nx\r\n")


def test_a_message_that_vanishes_is_reported_not_crashed_on(store, root):
    store.deliver("alice", MESSAGE)
    drop = store.open_maildrop("alice")
    try:
        (message,) = drop.snapshot()
        (path,) = (root / "alice" / "cur").iterdir()
        path.unlink()
        with pytest.raises(MessageVanished):
            drop.text(message.key)
        drop.mark_seen(message.key)  # nothing to mark, no error
        assert drop.expunge([message.key]) == 0  # already gone, as wanted
    finally:
        drop.release()


def test_listing_of_a_user_without_a_maildir_is_empty(store):
    assert store.messages("nobody") == []


def test_pop3_text_and_size_count_crlf_line_ends(tmp_path):
    cases = {b"a\nb\n": b"a\r\nb\r\n", b"a\r\nb\r\n": b"a\r\nb\r\n", b"a\nb": b"a\r\nb\r\n", b"": b"",
             b"\n\n": b"\r\n\r\n", b"a\rb\r\r\n": b"a\rb\r\r\n"}
    for data, text in cases.items():
        path = tmp_path / "m"
        path.write_bytes(data)
        with open(path, "rb") as file:
            assert b"".join(pop3_text(file)) == text
        with open(path, "rb") as file:
            assert pop3_size(file) == len(text)


def test_pop3_text_comes_in_blocks_of_whole_lines_even_where_a_read_splits_a_crlf(tmp_path):
    line = b"x" * (READ_BLOCK_OCTETS - 1) + b"\r\n"  # the first read ends between CR and LF
    path = tmp_path / "m"
    path.write_bytes(line * 3 + b"last")
    with open(path, "rb", buffering=0) as file:
        blocks = list(pop3_text(file))
    assert all(block.endswith(b"\r\n") for block in blocks) and len(blocks) > 1
    assert b"".join(blocks) == line * 3 + b"last\r\n"


def test_uid_is_the_unique_name_or_a_digest_where_that_will_not_do():
    assert uid_of("1700000000.M1P2Q3RABC.host,S=1,W=2") == "1700000000.M1P2Q3RABC.host"
    long_key = "1." + "x" * 80
    assert re.fullmatch(r"[0-9a-f]{40}", uid_of(long_key))
    assert re.fullmatch(r"[0-9a-f]{40}", uid_of("1.h\u00e9st"))
    assert uid_of(long_key) != uid_of(long_key + "y")


def test_maildir_path_never_leaves_the_root(store):
    with pytest.raises(UserError):
        store.maildir("../../etc")


# --- stale files (the Maildir spec: 36 hours) ----------------------------------------------


def test_remove_stale_files_removes_only_old_tmp_files(store, root):
    tmp = store.create_maildir("alice") / "tmp"
    old, fresh = tmp / "old", tmp / "fresh"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    (tmp / "olddir").mkdir()
    long_ago = time.time() - MAILDIR_TMP_MAX_AGE_SECONDS - 60
    os.utime(old, (long_ago, long_ago))
    os.utime(tmp / "olddir", (long_ago, long_ago))
    recent = time.time() - MAILDIR_TMP_MAX_AGE_SECONDS + 3600
    os.utime(fresh, (recent, recent))
    store.deliver("alice", MESSAGE)
    assert store.remove_stale_files() == 1
    assert listing(tmp) == ["fresh", "olddir"]
    assert len(listing(root / "alice" / "new")) == 1


def test_one_broken_maildir_does_not_keep_the_server_from_starting(store, start_server, root, caplog):
    store.create_maildir("alice")
    broken = store.create_maildir("bob") / "tmp"
    broken.rmdir()
    broken.write_bytes(b"not a directory")  # another program's doing
    with caplog.at_level(logging.WARNING, logger="pymailsrv.maildir"):
        server = start_server()
    assert server.addresses["smtp"]
    assert f"{broken}: cannot look for stale files: Not a directory" in caplog.messages


def test_server_start_removes_stale_tmp_files(store, start_server):
    tmp = store.create_maildir("alice") / "tmp"
    (tmp / "old").write_bytes(b"x")
    long_ago = time.time() - MAILDIR_TMP_MAX_AGE_SECONDS - 60
    os.utime(tmp / "old", (long_ago, long_ago))
    start_server()
    assert listing(tmp) == []


class _ShortReads:
    """A message file whose reads come back in the given sizes, as reads of a real file may."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._data, self._sizes = data, sizes

    def read(self, wanted: int) -> bytes:
        size = min(wanted, self._sizes.pop(0) if self._sizes else wanted)
        piece, self._data = self._data[:size], self._data[size:]
        return piece


def _sent_line_by_line(stored: bytes) -> bytes:
    """RETR's body by RFC 1939 §3 itself: each line with CRLF, a leading dot doubled, then '.'."""
    *ended, last = stored.split(b"\n")
    lines = [line.removesuffix(b"\r") for line in ended] + ([last] if last else [])
    return b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n" for line in lines) + b".\r\n"


@given(stored=st.binary(max_size=300) | st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b".."]),
                                                   max_size=60).map(b"".join),
       sizes=st.lists(st.integers(min_value=1, max_value=7), max_size=40))
def test_retr_in_blocks_sends_exactly_what_line_by_line_would(stored, sizes):
    """pop3_text and the block-wise byte-stuffing agree with the RFC's line-by-line rule, however reads split."""
    blocks = list(pop3_text(_ShortReads(stored, sizes)))
    assert all(block.endswith(b"\r\n") for block in blocks)
    assert b"".join(R.POP3_MESSAGE_FOLLOWS.with_content(blocks).body()) == _sent_line_by_line(stored)


@settings(max_examples=60)
@given(text=st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"x" * 50]), max_size=40).map(b"".join),
       split=st.integers(min_value=0, max_value=200))
def test_the_size_in_the_file_name_is_what_retr_sends(tmp_path_factory, text, split):
    """W= is counted as the text streams in, in pieces; STAT and LIST trust it, so it must match RETR."""
    store = MaildirStore(tmp_path_factory.mktemp("root"))
    incoming = store.receive(["alice"])
    incoming.write(text[:split])
    incoming.write(text[split:])
    incoming.commit()
    drop = store.open_maildrop("alice")
    try:
        (message,) = drop.snapshot()
        assert message.size == sum(map(len, drop.text(message.key)))
    finally:
        drop.release()
