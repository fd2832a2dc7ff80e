"""Running for real: ``start --run-as USER`` binds as root, then becomes USER.

The order is what matters: every listener is bound while the process is
root (ports below 1024 need it), then the process drops its supplementary
groups, sets its gid and its uid, and only then touches the data root. The
tests start ``python -m pymailsrv start`` as a process and read its
credentials from ``/proc/PID/status``. They need root and ``useradd`` to
make a throwaway system user, and are skipped without them; the refusals
that need neither run everywhere.
"""

from __future__ import annotations

import os
import poplib
import pwd
import re
import shutil
import smtplib
import ssl
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import trustme

from pymailsrv import replies as R
from pymailsrv.config import ConfigError
from pymailsrv.maildir import MaildirStore
from pymailsrv.outqueue import OutboundQueue
from pymailsrv.server import account_to_run_as
from pymailsrv.users import UserStore
from tests.conftest import CLIENT_TIMEOUT, PASSWORD
from tests.remote_side import FakeDns, Sink
from tests.test_crash import ServerProcess
from tests.test_pop3 import wire
from tests.test_relay import ZONE


@pytest.fixture
def system_user():
    """A throwaway system account (no home, no shell); removed at teardown."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd")
    name = f"pymt{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                           "--shell", "/usr/sbin/nologin", name], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.decode().strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)  # if userdel left it


@pytest.fixture
def shared_dir():
    """A directory every user may enter (pytest's own tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="pymailsrv-run-as-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_root(parent: Path, owner: pwd.struct_passwd | None) -> Path:
    """A data root with alice, as 'user add' run by root leaves it; then chown -R to ``owner``."""
    root = parent / "root"
    UserStore(root / ".pymailsrv").add("alice", PASSWORD)
    MaildirStore(root).create_maildir("alice")
    if owner is not None:
        for path in [root, *root.rglob("*")]:
            os.chown(path, owner.pw_uid, owner.pw_gid)
    return root


def credentials(pid: int) -> dict[str, list[int]]:
    """Uid, Gid (real, effective, saved, fs) and Groups from /proc/PID/status."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {key: [int(value) for value in re.search(rf"^{key}:[ \t]*(.*)$", status, re.MULTILINE)[1].split()]
            for key in ("Uid", "Gid", "Groups")}


def cli(root: Path, *arguments: str, given: bytes = b"") -> subprocess.CompletedProcess:
    """``python -m pymailsrv ARGUMENTS --root ROOT`` in a process of its own, as root, ``given`` on stdin."""
    return subprocess.run([sys.executable, "-m", "pymailsrv", *arguments, "--root", str(root)], input=given,
                          capture_output=True, timeout=CLIENT_TIMEOUT)


def owners(root: Path) -> set[tuple[int, int]]:
    """(uid, gid) of everything under ``root``."""
    return {(path.stat().st_uid, path.stat().st_gid) for path in root.rglob("*")}


def start_fails(root: Path, *arguments: str) -> str:
    """Run 'start' expecting it to refuse; returns the last line of its stderr."""
    server = ServerProcess(root, *arguments)
    try:
        assert server.wait_exit() == 1
    finally:
        server.stop()
    return server.output().strip().splitlines()[-1]


# --- dropping privileges ---------------------------------------------------------------


def test_run_as_drops_to_that_user_after_binding_and_still_serves(system_user, shared_dir):
    root = make_root(shared_dir, system_user)
    server = ServerProcess(root, "--run-as", system_user.pw_name).wait_listening()
    try:
        uid, gid = system_user.pw_uid, system_user.pw_gid
        assert credentials(server.pid) == {"Uid": [uid] * 4, "Gid": [gid] * 4, "Groups": []}
        with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
            assert client.sendmail("a@example.org", ["alice@localhost"], b"Subject: hi\r\n\r\nhi\r\n") == {}
        client = poplib.POP3(*server.addresses["pop3"], timeout=CLIENT_TIMEOUT)
        client.user("alice")
        assert client.pass_(PASSWORD).startswith(b"+OK")
        assert client.stat()[0] == 1
        client.quit()
        assert f"running as {system_user.pw_name} (uid {uid}, gid {gid})" in server.output()
    finally:
        server.stop()
    # Whatever the server made (the message, the lock file) belongs to the user.
    assert owners(root) == {(uid, gid)}


def test_a_command_run_as_root_on_a_users_data_root_writes_as_that_user(system_user, shared_dir):
    root = shared_dir / "root"
    UserStore(root / ".pymailsrv").add("alice", PASSWORD)
    MaildirStore(root).create_maildir("alice")
    OutboundQueue(root / ".pymailsrv").enqueue("alice@localhost", ["bob@example.net"], b"Subject: hi\n\nhi\n")
    for path in [root, *root.rglob("*")]:
        os.chown(path, system_user.pw_uid, system_user.pw_gid)
    for command, given in [(("user", "add", "carol", "--password-stdin"), b"pw\n"), (("queue", "flush"), b""),
                           (("deliver", "alice"), b"Subject: hi\n\nhi\n")]:
        done = cli(root, *command, given=given)
        assert done.returncode == 0, done.stderr
    # users.json and the queue entry rewritten, carol's Maildir made, alice's mail delivered: none is root's.
    assert owners(root) == {(system_user.pw_uid, system_user.pw_gid)}
    assert (root / "carol" / "new").is_dir()


@pytest.mark.parametrize("where", ["root's directory", "root's sheet in an open directory"])
def test_a_sheet_the_data_roots_owner_could_not_write_is_refused_before_any_account(system_user, shared_dir,
                                                                                     tmp_path, where):
    root = make_root(shared_dir, system_user)
    sheet = tmp_path / "sheet.csv"  # pytest's tmp_path is root's alone
    if where == "root's sheet in an open directory":
        sheet = shared_dir / "sheet.csv"
        sheet.write_text("left by a run as root\n")
        sheet.chmod(0o600)
    done = cli(root, "classroom", "setup", "--students", "2", "--csv", str(sheet), "--password-stdin",
               given=b"pw12345678\n")
    if where == "root's directory":
        assert done.returncode == 1
        assert done.stderr.decode().strip() == (f"Error: cannot write {sheet}: not writable by the data root's "
                                                f"owner, whom this command runs as")
    else:  # a sheet is never written over: its passwords are kept nowhere else
        assert done.returncode == 2
        assert done.stderr.decode().strip().splitlines()[-1] == (
            f"Error: Invalid value for '--csv': {sheet} is already there: give a new file name")
    assert UserStore(root / ".pymailsrv").names() == ["alice"]


def test_after_run_as_a_utf8_domain_and_an_aliases_file_need_nothing_more_loaded(system_user, shared_dir):
    # Codecs load on first use: after the switch of user, where the Python
    # installed is root's alone (as on this kind of machine), every RCPT got 451.
    root = make_root(shared_dir, system_user)
    aliases = root / ".pymailsrv" / "aliases"
    aliases.write_text("staff: alice\n")
    os.chown(aliases, system_user.pw_uid, system_user.pw_gid)
    server = ServerProcess(root, "--run-as", system_user.pw_name, "--domain", "bücher.example",
                           "--domain", "localhost").wait_listening()
    try:
        with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
            assert client.sendmail("a@example.org", ["staff@localhost", "alice@xn--bcher-kva.example"],
                                   b"Subject: hi\r\n\r\nhi\r\n") == {}
            # A reply that repeats non-ASCII text escapes it (the unicode_escape codec).
            assert client.mail("prøbe@example.org", ["SMTPUTF8"]) == (250, b"2.1.0 sender <pr\\xf8be@example.org> OK")
    finally:
        server.stop()
    assert len(MaildirStore(root).messages("alice")) == 1


@pytest.mark.parametrize("route", ["mx", "smarthost"])
def test_after_run_as_the_relay_needs_nothing_more_loaded(system_user, shared_dir, route):
    # dnspython loaded at the first MX lookup, after the switch of user: where
    # the Python installed is root's alone, mail for another domain failed at
    # every retry (ModuleNotFoundError; then, with the modules loaded, every
    # record read as generic data), and was never recorded. Through a
    # smarthost, the idna codec that socket.getaddrinfo loads did the same.
    dns, remote = FakeDns(ZONE), Sink()
    root = make_root(shared_dir, system_user)
    config = shared_dir / "pymailsrv.toml"
    hop = (f'dns_server = "{dns.address}"\nport = {remote.port}' if route == "mx"
           else f'smarthost = "127.0.0.1:{remote.port}"')
    config.write_text(f'[relay]\n{hop}\ntrusted_networks = ["127.0.0.0/8"]\n')
    server = ServerProcess(root, "--run-as", system_user.pw_name, "--config", str(config)).wait_listening()
    try:
        with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
            assert client.sendmail("alice@localhost", ["bob@implicit.example"], b"Subject: hi\r\n\r\nhi\r\n") == {}
        [received] = remote.wait_for(1)
        assert received.rcpt_tos == ["bob@implicit.example"]
    finally:
        server.stop()
        remote.stop()
        dns.stop()


def test_a_smarthost_ca_file_only_root_may_read_is_read_before_the_switch(system_user, shared_dir, tmp_path):
    # It was read at each delivery, as the server's user: every message was
    # deferred ("Permission denied") until it bounced, five days later.
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(tls)
    ca_file = tmp_path / "ca.pem"  # pytest's tmp_path is root's alone
    ca.cert_pem.write_to_path(str(ca_file))
    ca_file.chmod(0o600)
    remote = Sink(tls_context=tls)
    root = make_root(shared_dir, system_user)
    config = shared_dir / "pymailsrv.toml"
    config.write_text(f'[relay]\nsmarthost = "localhost:{remote.port}"\nsmarthost_tls = "verified"\n'
                      f'smarthost_ca_file = "{ca_file}"\ntrusted_networks = ["127.0.0.0/8"]\n')
    server = ServerProcess(root, "--run-as", system_user.pw_name, "--config", str(config)).wait_listening()
    try:
        with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
            assert client.sendmail("alice@localhost", ["bob@example.net"], b"Subject: hi\r\n\r\nhi\r\n") == {}
        [received] = remote.wait_for(1)
        assert received.tls and received.rcpt_tos == ["bob@example.net"]
    finally:
        server.stop()
        remote.stop()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv")
def test_a_generated_pair_root_cannot_look_for_is_one_line_with_the_way_out(system_user, shared_dir):
    # deploy.rst's unit keeps root out of the data root (no CAP_DAC_*): the
    # pair 'cert generate' made there, looked for as root, stopped start with
    # "Permission denied (.../cert.pem)" alone.
    root = make_root(shared_dir, system_user)
    assert cli(root, "cert", "generate").returncode == 0  # as the data root's owner, 0700 where the key is
    (root / ".pymailsrv").chmod(0o700)
    started = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m",
                              "pymailsrv", "start", "--root", str(root), "--smtp-port", "0", "--pop3-port", "0",
                              "--run-as", system_user.pw_name], capture_output=True, text=True, timeout=30)
    assert started.returncode == 1
    assert started.stderr.strip().splitlines()[-1] == (
        f"Error: cannot look for the generated TLS pair in {str(root / '.pymailsrv' / 'tls')!r} as root, which "
        "reads it before --run-as: give tls.cert and tls.key outside the data root")


def test_commands_that_switch_user_load_what_they_need_first(system_user, shared_dir):
    root = make_root(shared_dir, system_user)
    for command in (("alias", "add", "staff", "alice"), ("cert", "generate")):
        done = cli(root, *command)
        assert done.returncode == 0, done.stderr
    assert owners(root) == {(system_user.pw_uid, system_user.pw_gid)}


@pytest.mark.parametrize("root_owned, problem", [
    ("", "{root}"),  # the data root itself
    ("alice/new", "{root}/alice/new"),  # a Maildir made by 'user add' as root
    ("alice", "{root}/alice"),  # the Maildir itself, its own (0700): what is in it cannot be looked at
    (".pymailsrv/users.json", "{root}/.pymailsrv/users.json"),
])
def test_run_as_refuses_a_data_root_the_user_cannot_write(system_user, shared_dir, root_owned, problem):
    root = make_root(shared_dir, system_user)
    os.chown(root / root_owned, 0, 0)
    line = start_fails(root, "--run-as", system_user.pw_name)
    name = system_user.pw_name
    path = problem.format(root=root)
    kind = "readable" if path.endswith(".json") else "writable"
    assert line == (f"Error: {path!r} is not {kind} by {name}; the data root must belong to the user "
                    f"the server runs as: chown -R {name} {str(root)!r}")


def test_run_as_refuses_a_queue_it_cannot_list(system_user, shared_dir):
    # Written to and entered, but not listed (0300): the relay's first look
    # into the queue raised, after the listeners had started, and start
    # printed a traceback.
    root = make_root(shared_dir, system_user)
    queue = root / ".pymailsrv" / "queue"
    queue.mkdir()
    os.chown(queue, system_user.pw_uid, system_user.pw_gid)
    queue.chmod(0o300)
    name = system_user.pw_name
    assert start_fails(root, "--run-as", name) == (
        f"Error: {str(queue)!r} is not readable by {name}; the data root must belong to the user "
        f"the server runs as: chown -R {name} {str(root)!r}")


def test_run_as_refuses_a_queue_root_made_and_shut_with_the_chown_advice(system_user, shared_dir):
    # As after a start as root without --run-as: the queue is root's, 0700,
    # and even asking whether queue/tmp is a directory was refused, so start
    # said only "Permission denied", without the fix.
    root = make_root(shared_dir, system_user)
    (root / ".pymailsrv" / "queue" / "tmp").mkdir(parents=True)
    (root / ".pymailsrv" / "queue").chmod(0o700)  # root's: make_root chowned only what was there
    name = system_user.pw_name
    assert start_fails(root, "--run-as", name) == (
        f"Error: cannot look into {str(root / '.pymailsrv' / 'queue' / 'tmp')!r} as {name}; the data root must "
        f"belong to the user the server runs as: chown -R {name} {str(root)!r}")


# --- refusals that need no root --------------------------------------------------------------


def test_run_as_an_unknown_user_is_refused_in_one_line(tmp_path):
    root = tmp_path / "root"
    assert start_fails(root, "--run-as", "no-such-user-here") == \
        "Error: --run-as: there is no user 'no-such-user-here' on this system"
    assert not root.exists()  # refused before anything was touched


def test_a_file_in_the_way_is_not_told_to_chown(tmp_path):
    # chown mends what permissions refuse; a file where a directory must
    # go (or a read-only disk) it does not, so the advice is left out.
    root = tmp_path / "root"
    root.mkdir()
    (root / ".pymailsrv").write_bytes(b"")  # where the state directory goes
    who = pwd.getpwuid(os.geteuid()).pw_name
    assert start_fails(root) == f"Error: cannot create {str(root / '.pymailsrv')!r} as {who}: Not a directory"


def test_only_root_may_run_as_another_user(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    with pytest.raises(ConfigError, match=r"^--run-as root: only root can change user "
                                          r"\(this process runs as uid 4321\)$"):
        account_to_run_as("root")


def test_a_non_root_user_may_name_itself(monkeypatch):
    account = pwd.getpwuid(os.geteuid())
    monkeypatch.setattr(os, "geteuid", lambda: account.pw_uid)
    assert account_to_run_as(account.pw_name) == account


# --- files the server's user cannot read (root reads everything, so these run as another) ----


def test_an_unreadable_message_is_left_out_and_an_unreadable_maildrop_is_sys_temp(system_user, shared_dir):
    root = make_root(shared_dir, system_user)
    maildir = root / "alice"
    MaildirStore(root).deliver("alice", b"Subject: readable\n\nhello\n")
    # Another delivery agent's file, no W= in its name, that only root may read.
    (maildir / "new" / "1700000000.M1P99.otherhost").write_bytes(b"Subject: secret\n\nno\n")
    for path in [maildir, *maildir.rglob("*")]:
        if not path.name.startswith("1700000000"):
            os.chown(path, system_user.pw_uid, system_user.pw_gid)
    (maildir / "new" / "1700000000.M1P99.otherhost").chmod(0o600)
    server = ServerProcess(root, "--run-as", system_user.pw_name).wait_listening()
    try:
        client = poplib.POP3(*server.addresses["pop3"], timeout=CLIENT_TIMEOUT)
        client.user("alice")
        assert client.pass_(PASSWORD) == b"+OK alice's maildrop has 1 message (28 octets)"
        client.quit()
        assert "cannot read cur/1700000000.M1P99.otherhost:2,: Permission denied; left out" in server.output()
        # A maildrop it cannot list at all is a failure of ours, and gives the lock back.
        (maildir / "cur").chmod(0o000)
        client = poplib.POP3(*server.addresses["pop3"], timeout=CLIENT_TIMEOUT)
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.pass_(PASSWORD)
        (maildir / "cur").chmod(0o700)
        client.user("alice")
        assert client.pass_(PASSWORD).startswith(b"+OK")  # the lock was released
        client.quit()
    finally:
        server.stop()


def test_a_message_listed_from_its_name_but_unreadable_is_sys_perm_not_sys_temp(system_user, shared_dir):
    # Its size comes from W= in its name, so the login lists it unopened; a
    # retry will not mend its permissions (RFC 3206 §4), so the client is
    # not told to try again, and the log says which file.
    root = make_root(shared_dir, system_user)
    foreign = root / "alice" / "cur" / "1700000000.M1P99.otherhost,S=20,W=23:2,"
    foreign.write_bytes(b"Subject: secret\n\nno\n")
    foreign.chmod(0o600)  # root's, as another delivery agent left it
    server = ServerProcess(root, "--run-as", system_user.pw_name).wait_listening()
    try:
        client = poplib.POP3(*server.addresses["pop3"], timeout=CLIENT_TIMEOUT)
        client.user("alice")
        assert client.pass_(PASSWORD) == b"+OK alice's maildrop has 1 message (23 octets)"
        refusal = wire(R.POP3_MESSAGE_UNREADABLE, msg_number=1).rstrip(b"\r\n")
        for command in ("RETR 1", "TOP 1 0"):
            with pytest.raises(poplib.error_proto) as refused:
                client._shortcmd(command)
            assert refused.value.args[0] == refusal
        assert client.quit().startswith(b"+OK")
        assert f"cannot read cur/{foreign.name}: Permission denied" in server.output()
    finally:
        server.stop()


def test_mailbox_list_shows_what_a_login_lists_when_some_files_shut_its_user_out(system_user, shared_dir):
    # As POP3 lists them: the file sized by its name, listed; the one that
    # must be read for its size, left out with a warning. It used to stop
    # at the first with "cannot use ...: Permission denied".
    root = make_root(shared_dir, system_user)
    cur = root / "alice" / "cur"
    for name in ("1700000000.M1P99.otherhost,S=20,W=23:2,", "1700000001.M1P99.otherhost:2,"):
        (cur / name).write_bytes(b"Subject: secret\n\nno\n")
        (cur / name).chmod(0o600)  # root's, as another delivery agent left them
    # As that user, who may not read this Python (root's): what it needs is
    # loaded first, then the process becomes the user, as --run-as does.
    as_the_user = (f"import os, sys; from pymailsrv.cli import main; import pymailsrv.mailview, tabulate; "
                   f"os.setgroups([]); os.setgid({system_user.pw_gid}); os.setuid({system_user.pw_uid}); "
                   f"main(['mailbox', 'list', 'alice', '--root', {str(root)!r}])")
    listing = subprocess.run([sys.executable, "-c", as_the_user], capture_output=True, text=True,
                             timeout=CLIENT_TIMEOUT)
    assert listing.returncode == 0, listing.stderr
    [row] = listing.stdout.splitlines()[2:]
    assert row.split()[0] == "1" and "(cannot be read: Permission denied)" in row and row.split()[-1] == "23"
    assert listing.stderr.strip() == f"{root / 'alice'}: cannot read cur/1700000001.M1P99.otherhost:2,: " \
                                     "Permission denied; left out"
