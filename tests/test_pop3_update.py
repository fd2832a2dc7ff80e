"""What a POP3 session does to the maildrop: snapshot, lock, UPDATE (RFC 1939 §3-§8).

DELE only marks; the files go only when QUIT moves the session from
TRANSACTION to UPDATE. Everything here is checked on the real Maildir the
server works on, and locks are real ``flock``s, taken also by another process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pymailsrv import replies as R
from pymailsrv.limits import POP3_MAX_BAD_COMMANDS_AFTER_LOGIN
from pymailsrv.storage import MaildropLocked
from tests.conftest import PASSWORD, RawClient
from tests.test_pop3 import wire

MESSAGE = b"Subject: hi\n\nhello\n"
SYS_TEMP = b"-ERR [SYS/TEMP] temporary storage failure, try again later\r\n"
IN_USE = b"-ERR [IN-USE] maildrop is locked by another session\r\n"


@pytest.fixture
def login(raw, pop3_address, alice):
    """login() -> (RawClient, the reply to PASS)."""

    def login() -> tuple[RawClient, bytes]:
        client = raw(pop3_address)
        client.line()
        client.command("USER alice")
        return client, client.command(f"PASS {PASSWORD}")

    return login


def files(root: Path, subdir: str) -> list[str]:
    return sorted(path.name for path in (root / "alice" / subdir).iterdir())


def wait_until_unlocked(store, user: str = "alice", seconds: float = 5.0) -> None:
    """Poll until the server has seen a dropped connection and given up the lock."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            store.open_maildrop(user).release()
            return
        except MaildropLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def deliver(store, count: int) -> list[str]:
    return [store.deliver("alice", MESSAGE.replace(b"hello", f"message {n}".encode()))
            for n in range(1, count + 1)]


# --- UPDATE: deletion is deferred (RFC 1939 §6) ---------------------------------------


def test_dele_is_deferred_until_quit(login, store, root):
    deliver(store, 2)
    client, _ = login()
    assert client.command("DELE 1") == b"+OK message 1 deleted\r\n"
    assert len(files(root, "cur")) == 2  # only marked
    assert client.command("QUIT") == b"+OK pymailsrv POP3 server signing off (1 message left)\r\n"
    assert client.closed()
    remaining = store.messages("alice")
    assert len(remaining) == 1
    assert remaining[0][1].read_bytes() == b"Subject: hi\n\nmessage 2\n"


def test_quit_that_deletes_everything_says_the_maildrop_is_empty(login, store, root):
    deliver(store, 2)
    client, _ = login()
    client.command("DELE 1")
    client.command("DELE 2")
    assert client.command("QUIT") == b"+OK pymailsrv POP3 server signing off (maildrop empty)\r\n"
    assert files(root, "cur") == [] and files(root, "new") == []


def test_dele_is_undone_when_client_drops_without_quit(login, store, root):
    deliver(store, 2)
    client, _ = login()
    client.command("DELE 1")
    client.command("DELE 2")
    client.close()
    # The server notices the drop and releases the lock; then the mail is all there.
    wait_until_unlocked(store)
    client, reply = login()
    assert reply == wire(R.POP3_LOGGED_IN, user="alice", messages="2 messages", size=2 * 26)


def test_rset_unmarks_so_quit_removes_nothing(login, store):
    deliver(store, 2)
    client, _ = login()
    client.command("DELE 1")
    client.command("DELE 2")
    client.command("RSET")
    assert client.command("QUIT") == b"+OK pymailsrv POP3 server signing off (2 messages left)\r\n"
    assert len(store.messages("alice")) == 2


def test_quit_from_authorization_touches_nothing(raw, pop3_address, alice, store, root):
    deliver(store, 1)
    client = raw(pop3_address)
    client.line()
    client.command("USER alice")
    assert client.command("QUIT") == wire(R.POP3_SIGNING_OFF)
    assert client.closed()
    assert len(files(root, "new")) == 1 and files(root, "cur") == []


# --- the snapshot (RFC 1939 §5) ------------------------------------------------------


def test_mail_arriving_during_a_session_does_not_change_stat_or_list(login, store):
    deliver(store, 1)
    client, _ = login()
    store.deliver("alice", b"Subject: late\n\nlate\n")
    assert client.command("STAT") == b"+OK 1 26\r\n"
    client.send(b"LIST\r\n")
    assert client.multiline() == [b"+OK 1 message (26 octets)\r\n", b"1 26\r\n", b".\r\n"]
    assert client.command("RETR 2") == b"-ERR no such message\r\n"
    client.command("QUIT")
    # The next session sees it.
    client, reply = login()
    assert reply.startswith(b"+OK alice's maildrop has 2 messages")


def test_message_numbers_are_not_reassigned_after_dele(login, store):
    deliver(store, 3)
    client, _ = login()
    client.command("UIDL 3")
    uid3 = client.command("UIDL 3")
    client.command("DELE 1")
    client.command("DELE 2")
    assert client.command("UIDL 3") == uid3
    assert client.command("LIST 3") == b"+OK 3 26\r\n"
    assert client.command("LIST 1") == b"-ERR message 1 already deleted\r\n"


def test_login_moves_new_mail_to_cur_keeping_its_unique_name(login, store, root):
    deliver(store, 2)
    delivered = files(root, "new")
    client, _ = login()
    assert files(root, "new") == []
    assert files(root, "cur") == [name + ":2," for name in delivered]


def test_retr_marks_the_message_seen(login, store, root):
    deliver(store, 2)
    delivered = files(root, "new")
    client, _ = login()
    client.command("RETR 2")
    client.multiline()
    assert files(root, "cur") == [delivered[0] + ":2,", delivered[1] + ":2,S"]
    client.command("RETR 2")  # again: still one S
    client.multiline()
    assert files(root, "cur")[1] == delivered[1] + ":2,S"


def test_retr_adds_seen_to_the_flags_a_mail_reader_set(login, root):
    (root / "alice" / "cur" / "1000000000.flagged.example:2,F").write_bytes(MESSAGE)
    client, _ = login()
    client.command("RETR 1")
    client.multiline()
    assert files(root, "cur") == ["1000000000.flagged.example:2,FS"]


def test_messages_read_by_pop3_stay_readable_by_python_mailbox(login, store, root):
    import mailbox

    deliver(store, 1)
    client, _ = login()
    client.command("RETR 1")
    client.multiline()
    client.command("QUIT")
    messages = list(mailbox.Maildir(root / "alice", create=False))
    assert len(messages) == 1 and messages[0].get_flags() == "S"
    assert messages[0].get_subdir() == "cur"


# --- UIDL (RFC 1939 §7) ------------------------------------------------------------


def _uidl(client: RawClient) -> list[bytes]:
    client.send(b"UIDL\r\n")
    return [line.split()[1] for line in client.multiline()[1:-1]]


def test_uidl_is_unique_and_stable_across_sessions(login, store, root):
    deliver(store, 5)
    client, _ = login()
    first = _uidl(client)
    client.command("RETR 3")  # a flag change renames the file
    client.multiline()
    client.command("QUIT")
    client, _ = login()
    assert _uidl(client) == first
    assert len(set(first)) == 5
    # Derived from the Maildir unique name, not a counter.
    assert sorted(uid.decode() for uid in first) == sorted(name.split(",")[0] for name in files(root, "cur"))


def test_uidl_of_a_message_survives_its_neighbours_deletion(login, store):
    deliver(store, 3)
    client, _ = login()
    before = _uidl(client)
    client.command("DELE 1")
    client.command("QUIT")
    client, _ = login()
    assert _uidl(client) == before[1:]


# --- the maildrop lock (RFC 1939 §4) ------------------------------------------------


def test_second_login_to_a_locked_maildrop_gets_in_use(login):
    first, reply = login()
    assert reply.startswith(b"+OK")
    second, reply = login()
    assert reply == IN_USE
    assert second.command("NOOP") == b"-ERR NOOP is not valid in the AUTHORIZATION state\r\n"
    first.command("QUIT")
    second.command("USER alice")
    assert second.command(f"PASS {PASSWORD}").startswith(b"+OK")


def test_a_client_may_retry_a_locked_maildrop_without_being_cut_off(login):
    # RFC 3206 §3: IN-USE says to try again later. Unlike a bad command,
    # it does not count towards the three that close a session before login.
    first, _ = login()
    second, reply = login()
    for _ in range(4):
        assert second.command("USER alice") == b"+OK send PASS\r\n"
        assert second.command(f"PASS {PASSWORD}") == IN_USE
    first.command("QUIT")
    second.command("USER alice")
    assert second.command(f"PASS {PASSWORD}").startswith(b"+OK")


def test_maildrop_locked_by_another_process_gets_in_use(login, root):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from pymailsrv.maildir import MaildirStore\n"
         "drop = MaildirStore(sys.argv[1]).open_maildrop('alice')\n"
         "print('locked', flush=True)\n"
         "time.sleep(30)\n",
         str(root)],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        _, reply = login()
        assert reply == IN_USE
    finally:
        holder.kill()
        holder.wait(timeout=10)
        holder.stdout.close()
    # The kernel drops an flock with its process: no stale lock.
    _, reply = login()
    assert reply.startswith(b"+OK")


def test_lock_is_released_after_quit(login, store):
    client, _ = login()
    client.command("QUIT")
    assert client.closed()
    store.open_maildrop("alice").release()


def test_lock_is_released_when_the_client_drops(login, store):
    client, _ = login()
    client.close()
    wait_until_unlocked(store)  # fails after 5 s if the lock outlived the connection
    _, reply = login()
    assert reply.startswith(b"+OK")


def test_lock_is_not_taken_by_a_failed_login(raw, pop3_address, alice, store):
    client = raw(pop3_address)
    client.line()
    client.command("USER alice")
    assert client.command("PASS wrong") == wire(R.POP3_AUTH_FAILED)
    store.open_maildrop("alice").release()


def test_open_maildrop_refuses_a_second_holder_in_process(alice, store):
    held = store.open_maildrop("alice")
    try:
        with pytest.raises(MaildropLocked):
            store.open_maildrop("alice")
    finally:
        held.release()
    store.open_maildrop("alice").release()


# --- storage failures (RFC 3206 SYS/TEMP) and files changing underneath ------------------


def test_a_message_that_cannot_move_to_cur_is_read_from_new(login, store, root, caplog):
    # A name so long that with ":2," it is no name (NAME_MAX is 255 octets).
    # It used to fail the whole login, and so the user's every message.
    deliver(store, 1)
    stuck = root / "alice" / "new" / f"1700000000.{'x' * 242}"
    stuck.write_bytes(MESSAGE)
    client, reply = login()
    assert reply == b"+OK alice's maildrop has 2 messages (48 octets)\r\n"
    assert client.command("RETR 1") == b"+OK 22 octets\r\n"
    assert client.multiline() == [b"Subject: hi\r\n", b"\r\n", b"hello\r\n", b".\r\n"]
    assert client.command("DELE 1") == b"+OK message 1 deleted\r\n"
    assert client.command("QUIT").startswith(b"+OK")
    assert not stuck.exists()
    assert f"cannot move new/{stuck.name} to cur/: File name too long; read from new/" in caplog.text


def test_a_message_that_cannot_be_marked_seen_is_still_sent(login, store, root, caplog):
    # The S flag is for other mail readers; RETR must not fail for it.
    long_name = root / "alice" / "cur" / f"1700000000.{'x' * 241}:2,"  # 255 octets: no room for the S
    long_name.write_bytes(MESSAGE)
    client, _ = login()
    assert client.command("RETR 1") == b"+OK 22 octets\r\n"
    assert client.multiline()[-2:] == [b"hello\r\n", b".\r\n"]
    assert long_name.exists() and f"cannot mark cur/{long_name.name} seen: File name too long" in caplog.text


def test_maildir_that_is_not_a_directory_answers_sys_temp(login, root):
    cur = root / "alice" / "cur"
    cur.rmdir()
    cur.write_bytes(b"not a directory")
    _, reply = login()
    assert reply == SYS_TEMP


def test_unreadable_message_answers_sys_temp_without_exception_text(login, store, root):
    deliver(store, 1)
    client, _ = login()
    (path,) = (root / "alice" / "cur").iterdir()
    path.unlink()
    path.mkdir()  # open() now fails with IsADirectoryError
    assert client.command("RETR 1") == SYS_TEMP
    assert client.command("TOP 1 0") == SYS_TEMP
    assert client.command("NOOP") == b"+OK\r\n"


def test_quit_after_the_whole_maildir_was_removed_reports_nothing_left_over(login, store, root):
    # Every marked message went with the Maildir (RFC 1939 §6: -ERR only
    # where some remain). The fsync of the directory they were in used to
    # fail on its absence and make QUIT say some were not removed.
    deliver(store, 2)
    client, _ = login()
    shutil.rmtree(root / "alice")
    assert client.command("DELE 1") == b"+OK message 1 deleted\r\n"
    assert client.command("QUIT") == b"+OK pymailsrv POP3 server signing off (1 message left)\r\n"


def test_message_removed_underneath_the_session_is_reported_and_deletable(login, store, root):
    deliver(store, 2)
    client, _ = login()
    (first, _second) = sorted((root / "alice" / "cur").iterdir())
    first.unlink()
    vanished = b"-ERR message 1 has vanished: another program removed it from the maildrop\r\n"
    assert client.command("RETR 1") == vanished
    assert client.command("DELE 1") == b"+OK message 1 deleted\r\n"
    assert client.command("QUIT") == b"+OK pymailsrv POP3 server signing off (1 message left)\r\n"


def test_messages_removed_underneath_the_session_are_no_bad_commands(login, store, root):
    # A client fetching a maildrop another program emptied must reach QUIT:
    # cut off, it would fetch again what it had fetched and deleted.
    deliver(store, 2)
    client, _ = login()
    kept, removed = sorted((root / "alice" / "cur").iterdir())
    removed.unlink()
    assert client.command("RETR 1").startswith(b"+OK ")
    client.multiline()
    assert client.command("DELE 1") == b"+OK message 1 deleted\r\n"
    for _ in range(POP3_MAX_BAD_COMMANDS_AFTER_LOGIN + 1):
        assert client.command("RETR 2") == wire(R.POP3_MESSAGE_VANISHED, msg_number=2)
    assert client.command("QUIT") == b"+OK pymailsrv POP3 server signing off (1 message left)\r\n"
    assert not kept.exists()


def test_message_renamed_by_a_mail_reader_is_still_found(login, store, root):
    deliver(store, 1)
    client, _ = login()
    (path,) = (root / "alice" / "cur").iterdir()
    path.rename(path.with_name(path.name + "F"))  # mutt flagged it meanwhile
    assert client.command("RETR 1") == b"+OK 26 octets\r\n"
    assert client.multiline()[-2:] == [b"message 1\r\n", b".\r\n"]
    assert client.command("DELE 1").startswith(b"+OK")
    client.command("QUIT")
    assert store.messages("alice") == []


def test_quit_removes_every_message_a_mail_reader_renamed_and_one_it_deleted(login, store, root):
    # One look at the Maildir finds them all (at QUIT, a look per renamed
    # message was quadratic: 6.7 s for 2,000 of them, now 0.05 s).
    deliver(store, 30)
    client, _ = login()
    files = sorted((root / "alice" / "cur").iterdir())
    for path in files[1:]:
        path.rename(path.with_name(path.name + "F"))  # a reader flagged all but one...
    files[0].unlink()  # ... and deleted that one
    for number in range(1, 31):
        assert client.command(f"DELE {number}").startswith(b"+OK")
    assert client.command("QUIT").startswith(b"+OK")
    assert store.messages("alice") == []


def test_quit_reports_sys_temp_when_a_marked_message_cannot_be_removed(login, store, root):
    deliver(store, 1)
    client, _ = login()
    (path,) = (root / "alice" / "cur").iterdir()
    path.unlink()
    path.mkdir()  # unlink() of a directory fails
    client.command("DELE 1")
    assert client.command("QUIT") == b"-ERR [SYS/TEMP] some deleted messages were not removed\r\n"
    assert client.closed()
    store.open_maildrop("alice").release()


def test_uidl_values_look_like_rfc1939_unique_ids(login, store):
    deliver(store, 2)
    client, _ = login()
    assert all(re.fullmatch(rb"[\x21-\x7e]{1,70}", uid) for uid in _uidl(client))


def test_the_lock_belongs_to_the_maildrop_whatever_the_spelling_of_the_name(alice, store):
    held = store.open_maildrop("alice")
    try:
        with pytest.raises(MaildropLocked):
            store.open_maildrop("ALICE")
    finally:
        held.release()
