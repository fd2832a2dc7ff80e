"""The outbound queue on disk: durable enqueue, per-recipient state, retries, the CLI."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from pymailsrv import durable, outqueue
from pymailsrv.cli import main
from pymailsrv.limits import MAILDIR_TMP_MAX_AGE_SECONDS
from pymailsrv.outqueue import OutboundQueue, Outcome, QueueEntry, Recipient, RetryPolicy, State
from pymailsrv.storage import StorageError

MESSAGE = b"Subject: hi\n\nbody\n"
DELIVERED = Outcome(State.DELIVERED, "2.0.0", "smtp; 250 2.0.0 OK", "mx.example.net")
DEFERRED = Outcome(State.PENDING, "4.2.2", "smtp; 452 4.2.2 mailbox full", "mx.example.net")
FAILED = Outcome(State.FAILED, "5.1.1", "smtp; 550 5.1.1 no such user", "mx.example.net")


def failing_fsync(directory):
    """fsync_directory, failing with EIO for ``directory`` (a disk error injected at the storage boundary)."""
    real_fsync_directory = durable.fsync_directory

    def fsync_directory(path):
        if path == directory:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync_directory(path)

    return fsync_directory


@pytest.fixture
def queue(root) -> OutboundQueue:
    return OutboundQueue(root / ".pymailsrv", RetryPolicy(min_backoff=10, max_backoff=35, max_queue_lifetime=100))


def test_an_enqueued_message_is_a_message_file_and_an_envelope(queue):
    queue_id = queue.enqueue("alice@example.org", ["bob@example.net", "carol@example.com"], MESSAGE, now=1000.0)
    assert queue.message_path(queue_id).read_bytes() == MESSAGE
    envelope = json.loads((queue.directory / f"{queue_id}.json").read_text())
    assert envelope["sender"] == "alice@example.org" and envelope["created"] == 1000.0
    assert [(r["address"], r["state"], r["attempts"]) for r in envelope["recipients"]] == [
        ("bob@example.net", "pending", 0), ("carol@example.com", "pending", 0)]
    assert os.listdir(queue.directory / "tmp") == []


def test_a_streamed_message_is_queued_only_on_commit(queue):
    incoming = queue.receive()
    incoming.write(b"Subject: hi\n\n")
    assert queue.ids() == []
    incoming.write(b"body\n")
    queue_id = incoming.commit("alice@example.org", ["bob@example.net"])
    assert queue.ids() == [queue_id] and queue.message_path(queue_id).read_bytes() == MESSAGE
    discarded = queue.receive()
    discarded.write(b"never mind")
    discarded.discard()
    assert queue.ids() == [queue_id] and os.listdir(queue.directory / "tmp") == []


def held_message(queue: OutboundQueue) -> str:
    """A message committed as SMTP commits an outside copy: held, until release or delete."""
    incoming = queue.receive()
    incoming.write(MESSAGE)
    return incoming.commit("a@example.org", ["b@example.net"], held=True)


def test_a_held_message_is_queued_only_on_release(queue):
    """SMTP holds the outside copy while it delivers the local ones, then releases it (RFC 5321 §6.1)."""
    wakeups = []
    queue.wakeup = lambda: wakeups.append(1)
    queue_id = held_message(queue)
    assert queue.ids() == [] and queue.entries() == [] and queue.due() == [] and wakeups == []
    assert queue.get(queue_id) is None and queue.message_path(queue_id).read_bytes() == MESSAGE
    queue.release(queue_id)
    assert [entry.queue_id for entry in queue.due()] == [queue_id] and wakeups == [1]
    assert (queue.directory / f"{queue_id}.json").exists()
    assert os.listdir(queue.directory / "tmp") == []


def test_a_held_message_is_held_in_every_process(queue):
    """The hold is on disk: a relay in another process (or after a restart) does not see it either."""
    queue_id = held_message(queue)
    other_process = OutboundQueue(queue.directory.parent)
    assert other_process.ids() == [] and other_process.due() == []
    queue.release(queue_id)
    assert [entry.queue_id for entry in other_process.due()] == [queue_id]


def test_delete_takes_a_held_message_back(queue):
    """SMTP's answer to a failed local delivery: 451, and no outside copy left anywhere."""
    queue_id = held_message(queue)
    assert queue.delete(queue_id)
    assert not queue.message_path(queue_id).exists() and os.listdir(queue.directory / "tmp") == []
    assert not queue.delete(queue_id)


def test_a_release_whose_fsync_fails_takes_the_message_back(queue, monkeypatch):
    # The client hears 451 and sends again: the outside copy must not go as well.
    queue_id = held_message(queue)
    monkeypatch.setattr(outqueue, "fsync_directory", failing_fsync(queue.directory))
    with pytest.raises(StorageError):
        queue.release(queue_id)
    monkeypatch.undo()
    assert queue.ids() == [] and not queue.message_path(queue_id).exists()
    assert os.listdir(queue.directory / "tmp") == []


def test_delete_removes_both_envelopes_that_a_crash_in_release_could_leave(queue):
    queue_id = held_message(queue)
    (queue.directory / f"{queue_id}.json").write_bytes((queue.directory / "tmp" / f"{queue_id}.json").read_bytes())
    assert queue.delete(queue_id)
    assert queue.ids() == [] and not queue.message_path(queue_id).exists()
    assert os.listdir(queue.directory / "tmp") == []


def test_a_message_held_when_the_server_crashed_is_never_sent_and_removed_once_old(queue):
    """kill -9 before release: the client heard no 250 and sends again, so this copy must not go."""
    queue_id = held_message(queue)
    after_restart = OutboundQueue(queue.directory.parent)
    assert after_restart.ids() == [] and after_restart.due() == []
    assert after_restart.remove_stale_files() == 0  # too young: may be a hold in progress elsewhere
    assert after_restart.remove_stale_files(now=time.time() + MAILDIR_TMP_MAX_AGE_SECONDS + 1) == 2
    assert not queue.message_path(queue_id).exists() and os.listdir(queue.directory / "tmp") == []


def test_postponed_in_memory_a_message_is_not_due_until_then_in_this_process(queue):
    """How the relay backs off after an attempt whose outcome could not be written down."""
    queue_id = queue.enqueue("a@example.org", ["b@example.net"], MESSAGE)
    queue.postpone_in_memory(queue_id, time.monotonic() + 3600)
    assert queue.due() == [] and queue.ids() == [queue_id]
    assert [entry.queue_id for entry in OutboundQueue(queue.directory.parent).due()] == [queue_id]
    queue.postpone_in_memory(queue_id, time.monotonic())  # its time has come
    assert [entry.queue_id for entry in queue.due()] == [queue_id]


def test_a_postponement_never_brings_a_later_attempt_forward(queue):
    # A bounce the disk would not take postpones the message by min_backoff;
    # that used to overwrite a recipient's longer backoff, retried early.
    queue_id = queue.enqueue("a@example.org", ["b@example.net"], MESSAGE)
    later = queue.record(queue_id, {"b@example.net": DEFERRED}).next_attempt  # min_backoff (10 s) away
    assert queue.postpone(queue_id, time.time() + 1).next_attempt == later
    assert queue.postpone(queue_id, later + 60).next_attempt == later + 60


def test_a_queue_opened_anew_holds_everything_as_before(queue, root):
    first = queue.enqueue("a@example.org", ["b@example.net"], MESSAGE)
    second = queue.enqueue("a@example.org", ["c@example.net"], MESSAGE)
    queue.record(first, {"b@example.net": DEFERRED})
    reopened = OutboundQueue(root / ".pymailsrv")
    assert reopened.ids() == sorted([first, second])
    assert reopened.get(first).recipients[0].last_error == DEFERRED.diagnostic


def test_each_recipient_keeps_its_own_outcome(queue):
    queue_id = queue.enqueue("a@example.org", ["ok@x.net", "later@x.net", "bad@x.net"], MESSAGE, now=0.0)
    entry = queue.record(queue_id, {"ok@x.net": DELIVERED, "later@x.net": DEFERRED, "bad@x.net": FAILED},
                         now=1.0)
    assert [(r.address, r.state, r.attempts, r.last_error) for r in entry.recipients] == [
        ("ok@x.net", State.DELIVERED, 1, None),
        ("later@x.net", State.PENDING, 1, DEFERRED.diagnostic),
        ("bad@x.net", State.FAILED, 1, FAILED.diagnostic)]
    assert [r.address for r in entry.unreported_failures] == ["bad@x.net"]
    assert entry.next_attempt == 1.0 + 10 and not entry.finished
    # A later attempt touches only the recipient still pending.
    entry = queue.record(queue_id, {"later@x.net": DELIVERED}, now=12.0)
    assert [r.state for r in entry.recipients] == [State.DELIVERED, State.DELIVERED, State.FAILED]
    entry = queue.mark_reported(queue_id, ["bad@x.net"])
    assert entry.finished


def test_the_backoff_doubles_up_to_its_maximum():
    policy = RetryPolicy()  # Postfix's defaults
    assert [policy.delay(n) for n in range(1, 7)] == [300, 600, 1200, 2400, 4000, 4000]
    assert policy.max_queue_lifetime == 5 * 24 * 3600


def test_the_backoff_stays_at_its_maximum_after_thousands_of_attempts():
    # Each flush is an attempt: 2 ** 1024 used to overflow, the outcome was
    # never recorded, and accepted recipients were sent the message again.
    assert RetryPolicy().delay(1025) == RetryPolicy().delay(10 ** 6) == 4000
    assert RetryPolicy(min_backoff=0).delay(10 ** 6) == 0


def test_retries_are_scheduled_with_backoff(queue):
    queue_id = queue.enqueue("a@example.org", ["b@example.net"], MESSAGE, now=0.0)
    waits = []
    now = 0.0
    for _ in range(4):
        entry = queue.record(queue_id, {"b@example.net": DEFERRED}, now=now)
        waits.append(entry.next_attempt - now)
        now = entry.next_attempt
    assert waits == [10, 20, 35, 35]


def test_a_recipient_deferred_past_the_queue_lifetime_fails(queue):
    queue_id = queue.enqueue("a@example.org", ["b@example.net"], MESSAGE, now=0.0)
    entry = queue.record(queue_id, {"b@example.net": DEFERRED}, now=100.0)
    [recipient] = entry.recipients
    # RFC 3464 §2.3.3: failed, with the last (temporary) status as it was.
    assert recipient.state is State.FAILED and recipient.status == DEFERRED.status
    assert (recipient.last_error, recipient.gave_up_after) == (DEFERRED.diagnostic, 100.0)


def test_the_last_retry_comes_when_the_queue_lifetime_ends_not_a_backoff_later(queue):
    # The lifetime is 100 s: a backoff of 10 s from 95 s would bounce at 105 s.
    queue_id = queue.enqueue("a@example.org", ["b@example.net"], MESSAGE, now=0.0)
    assert queue.record(queue_id, {"b@example.net": DEFERRED}, now=95.0).next_attempt == 100.0
    entry = queue.record(queue_id, {"b@example.net": DEFERRED}, now=100.0)
    assert [recipient.state for recipient in entry.recipients] == [State.FAILED]


def test_recipients_settled_mid_attempt_stay_done_though_the_attempt_is_never_recorded(queue):
    # A crash between two hosts: what the first took must not be sent again.
    queue_id = queue.enqueue("a@example.org", ["b@example.net", "c@example.org", "d@example.com"], MESSAGE,
                             now=0.0)
    queue.settle(queue_id, {"b@example.net": DELIVERED, "c@example.org": DEFERRED, "d@example.com": FAILED})
    entry = OutboundQueue(queue.directory.parent, RetryPolicy()).get(queue_id)  # as after a restart
    assert [(recipient.address, recipient.state) for recipient in entry.recipients] == [
        ("b@example.net", State.DELIVERED), ("c@example.org", State.PENDING), ("d@example.com", State.FAILED)]
    assert (entry.attempts, entry.next_attempt) == (0, 0.0)  # scheduling stays record()'s
    assert [recipient.address for recipient in entry.unreported_failures] == ["d@example.com"]


def test_due_lists_what_may_be_tried_now_longest_waiting_first(queue):
    late = queue.enqueue("a@example.org", ["b@example.net"], MESSAGE, now=50.0)
    early = queue.enqueue("a@example.org", ["c@example.net"], MESSAGE, now=10.0)
    waiting = queue.enqueue("a@example.org", ["d@example.net"], MESSAGE, now=0.0)
    queue.record(waiting, {"d@example.net": DEFERRED}, now=60.0)  # due at 70
    assert [entry.queue_id for entry in queue.due(now=60.0)] == [early, late]
    assert [entry.queue_id for entry in queue.due(now=70.0)] == [early, late, waiting]


def test_flush_makes_everything_due_now(queue):
    queue_id = queue.enqueue("a@example.org", ["b@example.net"], MESSAGE, now=0.0)
    queue.record(queue_id, {"b@example.net": DEFERRED}, now=1.0)
    assert queue.due(now=2.0) == []
    woken = []
    queue.wakeup = lambda: woken.append(True)
    assert queue.flush(now=2.0) == 1
    assert [entry.queue_id for entry in queue.due(now=2.0)] == [queue_id] and woken


def test_delete_removes_the_envelope_and_the_message(queue):
    queue_id = queue.enqueue("a@example.org", ["b@example.net"], MESSAGE)
    assert queue.delete(queue_id)
    assert queue.ids() == [] and not queue.message_path(queue_id).exists()
    assert not queue.delete(queue_id)
    assert queue.record(queue_id, {"b@example.net": DELIVERED}) is None


def put_broken_entries(queue: OutboundQueue) -> list[str]:
    """What a stray mkdir, a crash or a hand edit leaves in the queue; returns the file names."""
    queue.directory.mkdir(parents=True, exist_ok=True)
    (queue.directory / "STRAY.json").mkdir()
    (queue.directory / "GARBAGE.json").write_bytes(b"{not json \xff")
    envelope = json.loads(QueueEntry("WRONGTYPES", "a@example.org", [Recipient("b@example.net")],
                                     created=0.0, next_attempt=0.0).to_json())
    (queue.directory / "WRONGTYPES.json").write_text(json.dumps(
        {**envelope, "created": "yesterday", "recipients": "b@example.net"}))
    (queue.directory / "OTHERNAME.json").write_text(json.dumps(envelope))  # a copy: its id is not its name
    # Valid JSON that still breaks a reader: a number no float holds, and nesting past the recursion limit.
    (queue.directory / "HUGE.json").write_text(json.dumps(envelope).replace('"created": 0.0', '"created": 1' + "0" * 400))
    (queue.directory / "DEEP.json").write_text("[" * 200_000 + "]" * 200_000)
    # JSON's NaN: a float, but a message due then would never be due, nor expire.
    (queue.directory / "NAN.json").write_text(json.dumps({**envelope, "queue_id": "NAN", "next_attempt": math.nan}))
    return ["STRAY.json", "GARBAGE.json", "WRONGTYPES.json", "OTHERNAME.json", "HUGE.json", "DEEP.json",
            "NAN.json"]


def test_broken_envelopes_are_skipped_with_one_warning_each(queue, caplog):
    good = queue.enqueue("a@example.org", ["b@example.net"], MESSAGE)
    broken = put_broken_entries(queue)
    with caplog.at_level(logging.WARNING, logger="pymailsrv.outqueue"):
        for _ in range(3):  # the relay looks once a second: one warning each, not one a look
            assert [entry.queue_id for entry in queue.entries()] == [good]
            assert [entry.queue_id for entry in queue.due()] == [good]
    warned = [name for record in caplog.records for name in broken if f"/{name} is not a" in record.getMessage()]
    assert sorted(warned) == sorted(broken)
    assert queue.flush() == 1 and queue.remove_stale_files() == 0


@pytest.mark.parametrize("field, value", [("created", "yesterday"), ("attempts", True), ("recipients", "bob"),
                                          ("recipients", [{"address": "b", "state": "lost"}]),
                                          ("recipients", [{"address": "b", "status": 451}]),
                                          ("sender", None), ("unknown", 1)])
def test_an_envelope_with_a_wrong_field_is_refused_when_read(field, value):
    envelope = json.loads(QueueEntry("A", "a@example.org", [Recipient("b")], 1.0, 2.0).to_json())
    with pytest.raises(ValueError):
        QueueEntry.from_json(json.dumps({**envelope, field: value}).encode())
    del envelope["sender"]
    with pytest.raises(ValueError, match="missing field sender"):
        QueueEntry.from_json(json.dumps(envelope).encode())


def test_leftovers_of_a_crashed_enqueue_are_removed_once_old(queue):
    queue.enqueue("a@example.org", ["b@example.net"], MESSAGE)
    orphan = queue.directory / "ORPHAN.msg"  # a crash between the .msg and its envelope
    orphan.write_bytes(MESSAGE)
    stale = queue.directory / "tmp" / "STALE"
    stale.write_bytes(b"half a mess")
    assert queue.remove_stale_files() == 0  # too young: may be an enqueue in progress
    assert queue.remove_stale_files(now=time.time() + MAILDIR_TMP_MAX_AGE_SECONDS + 1) == 2
    assert not orphan.exists() and not stale.exists() and len(queue.ids()) == 1


def test_an_enqueue_whose_last_fsync_fails_leaves_no_envelope_and_no_message(queue, monkeypatch):
    # The envelope is renamed into place, then the directory's fsync fails:
    # the client hears 451 and sends again, so nothing may stay to go out.
    monkeypatch.setattr(durable, "fsync_directory", failing_fsync(queue.directory))
    with pytest.raises(StorageError):
        queue.enqueue("alice@example.org", ["bob@example.net"], MESSAGE)
    assert queue.ids() == []
    assert sorted(path.name for path in queue.directory.iterdir()) == ["lock", "tmp"]
    assert os.listdir(queue.directory / "tmp") == []


def test_a_message_needs_a_recipient(queue):
    with pytest.raises(ValueError):
        queue.enqueue("a@example.org", [], MESSAGE)
    assert queue.ids() == [] and not list(queue.directory.glob("*.msg"))


# --- the CLI -------------------------------------------------------------------------


def test_queue_list_flush_and_delete(queue, root):
    runner = CliRunner()
    assert "the queue is empty" in runner.invoke(main, ["queue", "list", "--root", str(root)]).output
    queue_id = queue.enqueue("alice@example.org", ["bob@example.net"], MESSAGE)
    queue.record(queue_id, {"bob@example.net": DEFERRED})
    listing = runner.invoke(main, ["queue", "list", "--root", str(root)])
    assert listing.exit_code == 0
    for column in ("id", "age", "sender", "recipients", "attempts", "next try", "last error"):
        assert column in listing.output
    assert queue_id in listing.output and "<alice@example.org>" in listing.output
    assert "452 4.2.2 mailbox full" in listing.output and "in 10s" in listing.output
    flushed = runner.invoke(main, ["queue", "flush", "--root", str(root)])
    assert flushed.output.strip() == "1 message due now"
    assert "now" in runner.invoke(main, ["queue", "list", "--root", str(root)]).output
    assert runner.invoke(main, ["queue", "delete", queue_id, "--root", str(root)]).exit_code == 0
    missing = runner.invoke(main, ["queue", "delete", queue_id, "--root", str(root)])
    assert missing.exit_code == 1 and "no message" in missing.output
    assert queue.ids() == []


def test_queue_list_shows_the_error_the_message_waits_on(queue, root):
    # Bob is waiting; carol has failed, her bounce not yet made: the column
    # used to show her error, the last one, which nothing waits on.
    queue_id = queue.enqueue("alice@example.org", ["bob@example.net", "carol@example.net"], MESSAGE)
    queue.record(queue_id, {"bob@example.net": DEFERRED, "carol@example.net": FAILED})
    listing = CliRunner().invoke(main, ["queue", "list", "--root", str(root)]).output
    assert "452 4.2.2 mailbox full" in listing and "no such user" not in listing


def test_queue_list_is_oldest_first(queue, root):
    # Ids begin with the second they were made in, then random digits: in
    # one second, their order is not the order of arrival.
    arrivals = {queue.enqueue("alice@example.org", ["bob@example.net"], MESSAGE, now=created): created
                for created in (30.0, 10.0, 20.0, 40.0, 0.0)}
    listing = CliRunner().invoke(main, ["queue", "list", "--root", str(root)])
    listed = [line.split()[0] for line in listing.output.splitlines()[2:]]
    assert listed == sorted(arrivals, key=arrivals.get)


def test_queue_list_shows_the_good_entries_beside_broken_ones(queue, root, clean_environment):
    """A real process, so stderr is what a person sees: one line per broken file, no traceback."""
    good = queue.enqueue("alice@example.org", ["bob@example.net"], MESSAGE)
    broken = put_broken_entries(queue)
    listing = subprocess.run([sys.executable, "-m", "pymailsrv", "queue", "list", "--root", str(root)],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0
    assert [line.split()[0] for line in listing.stdout.splitlines()[2:]] == [good]
    warnings = listing.stderr.splitlines()
    assert sorted(line.split(" is not a")[0].rsplit("/", 1)[1] for line in warnings) == sorted(broken)
    assert all(" is not a readable queue entry, skipped" in line for line in warnings)


@pytest.mark.parametrize("queue_id", ["../x", "nonexistent", "../../etc/passwd", ""])
def test_queue_delete_refuses_what_is_not_a_queue_id(queue, root, queue_id):
    good = queue.enqueue("alice@example.org", ["bob@example.net"], MESSAGE)
    result = CliRunner().invoke(main, ["queue", "delete", queue_id, "--root", str(root)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {queue_id!r} is not a queue id (16 hex digits, as `queue list` shows)\n"
    assert queue.ids() == [good]


def test_an_entry_finished_just_before_a_crash_is_due_to_be_removed(queue):
    # kill -9 between the last record() and delete(): nothing left to send, but the files stay.
    queue_id = queue.enqueue("a@example.org", ["b@example.net"], b"Subject: x\n\nx\n")
    queue.record(queue_id, {"b@example.net": Outcome(State.DELIVERED, "2.0.0", "smtp; 250 2.0.0 OK")})
    after_restart = OutboundQueue(queue.directory.parent, RetryPolicy())
    [entry] = after_restart.due()
    assert entry.queue_id == queue_id and entry.finished


def test_an_envelope_rewrite_a_crash_left_half_done_is_removed_once_old(queue):
    queue_id = queue.enqueue("a@example.org", ["b@example.net"], b"Subject: x\n\nx\n")
    left = queue.directory / f"{queue_id}.json.tmp"  # written, never renamed over the envelope
    left.write_bytes(b'{"queue_id": ')
    assert queue.remove_stale_files() == 0
    assert queue.remove_stale_files(now=time.time() + MAILDIR_TMP_MAX_AGE_SECONDS + 1) == 1
    assert not left.exists() and queue.ids() == [queue_id]


def test_the_envelopes_read_again_only_when_changed_still_show_every_change(queue):
    queue_id = queue.enqueue("a@example.org", ["b@example.net", "c@example.net"], b"Subject: x\n\nx\n")
    [before] = queue.entries()
    queue.record(queue_id, {"b@example.net": DELIVERED})
    [after] = queue.entries()
    assert [recipient.state for recipient in before.recipients] == [State.PENDING, State.PENDING]
    assert [recipient.state for recipient in after.recipients] == [State.DELIVERED, State.PENDING]
    assert queue.entries()[0] is after  # unchanged on disk: not parsed again
    envelope = queue.directory / f"{queue_id}.json"
    envelope.write_bytes(envelope.read_bytes()[:-1])  # changed in place, and broken
    assert queue.entries() == []
    queue.delete(queue_id)
    assert queue.entries() == []
