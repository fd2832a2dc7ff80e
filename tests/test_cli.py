"""The ``pymailsrv`` command line: exit codes, one-line errors, tables, and a real start.

Most tests drive the click group in-process with ``CliRunner`` against a temp
root; a few run ``python -m pymailsrv`` as a real subprocess, including the
end-to-end test: start the server on port 0, log in with poplib, stop it with
SIGTERM or SIGINT and expect exit status 0 with nothing alarming on stderr.
"""

from __future__ import annotations

import base64
import json
import os
import poplib
import re
import shutil
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pymailsrv.cli import EX_DATAERR, EX_NOUSER, EX_TEMPFAIL, main
from pymailsrv.maildir import MaildirStore
from pymailsrv.users import UserStore
from tests.conftest import CLIENT_TIMEOUT, PASSWORD, START_TIMEOUT, listening_line, start_process

MESSAGE = b"From: Bob <bob@example.org>\nSubject: Hello there\nDate: Mon, 1 Jan 2024 10:00:00 +0000\n\nhi\n"


pytestmark = pytest.mark.usefixtures("clean_environment")


@pytest.fixture
def cli(root):
    """cli(*args, input=None) -> click Result, with --root pointing at the temp root."""

    def run(*args: str, input: str | bytes | None = None, root_option: bool = True):
        arguments = list(args)
        if root_option:
            arguments += ["--root", str(root)]
        return CliRunner().invoke(main, arguments, input=input)

    return run


def one_line_error(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# --- user add / remove / passwd / list -------------------------------------------------


def test_user_add_with_password_stdin_creates_user_and_maildir(cli, root):
    result = cli("user", "add", "Alice", "--password-stdin", input=f"{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "added user alice\n"
    users = UserStore(root / ".pymailsrv")
    assert users.check_password("alice", PASSWORD)
    assert users.apop_secret("alice") is None
    assert sorted(path.name for path in (root / "alice").iterdir()) == ["cur", "new", "tmp"]


def test_user_add_prompts_twice_for_a_hidden_password(cli, root):
    result = cli("user", "add", "alice", input="s3cret\ns3cret\n")
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output and "s3cret" not in result.output
    assert UserStore(root / ".pymailsrv").check_password("alice", "s3cret")


def test_user_add_with_apop_keeps_the_secret(cli, root):
    assert cli("user", "add", "alice", "--password-stdin", "--apop", input="pw\n").exit_code == 0
    assert UserStore(root / ".pymailsrv").apop_secret("alice") == "pw"


def test_duplicate_user_is_exit_1_with_one_line(cli):
    cli("user", "add", "alice", "--password-stdin", input="pw\n")
    result = cli("user", "add", "ALICE", "--password-stdin", input="pw\n")
    assert result.exit_code == 1
    assert one_line_error(result) == "Error: user 'alice' already exists"


@pytest.mark.parametrize("name", ["../evil", ".pymailsrv", "a/b", "_x", "caf\u00e9", "\u212aate"])
def test_invalid_user_name_is_exit_1_and_creates_nothing(cli, root, name):
    result = cli("user", "add", name, "--password-stdin", input="pw\n")
    assert result.exit_code == 1
    assert one_line_error(result).startswith("Error: invalid user name")
    assert list(root.iterdir()) == []
    assert not (root.parent / "evil").exists()


def test_empty_password_is_refused(cli, root):
    result = cli("user", "add", "alice", "--password-stdin", input="\n")
    assert result.exit_code == 1
    assert one_line_error(result) == "Error: the password may not be empty"
    assert UserStore(root / ".pymailsrv").names() == []


def test_user_remove_keeps_mail_and_purge_deletes_it(cli, root):
    cli("user", "add", "alice", "--password-stdin", input="pw\n")
    cli("user", "add", "bob", "--password-stdin", input="pw\n")
    result = cli("user", "remove", "alice")
    assert (result.exit_code, result.stdout) == (0, "removed user alice\n")
    assert (root / "alice" / "new").is_dir()
    result = cli("user", "remove", "bob", "--purge")
    assert (result.exit_code, result.stdout) == (0, "removed user bob and their mail\n")
    assert not (root / "bob").exists()
    assert UserStore(root / ".pymailsrv").names() == []
    result = cli("user", "remove", "bob")
    assert result.exit_code == 1
    assert one_line_error(result) == "Error: no such user 'bob'"


def test_purge_refuses_a_mailbox_a_pop3_session_holds_and_removes_nothing(cli, root, add_user, store, pop3):
    # It deleted the Maildir under the session, which read on in a mailbox
    # gone; 'classroom reset' already left such a mailbox alone.
    add_user("alice")
    store.deliver("alice", b"Subject: a\n\nx\n")
    client = pop3()
    client.user("alice")
    client.pass_(PASSWORD)  # holds the maildrop lock (RFC 1939 §4)
    result = cli("user", "remove", "alice", "--purge")
    assert result.exit_code == 1
    assert one_line_error(result) == (
        "Error: alice is logged in over POP3: nothing removed; try again once that session ends")
    assert UserStore(root / ".pymailsrv").exists("alice") and len(store.messages("alice")) == 1
    assert client.stat() == (1, 17)
    client.quit()
    result = cli("user", "remove", "alice", "--purge")
    assert (result.exit_code, result.stdout) == (0, "removed user alice and their mail\n")
    assert not (root / "alice").exists()


def test_user_passwd_changes_the_password(cli, root):
    cli("user", "add", "alice", "--password-stdin", input="old\n")
    result = cli("user", "passwd", "alice", "--password-stdin", input="new\n")
    assert (result.exit_code, result.stdout) == (0, "changed the password of alice\n")
    assert UserStore(root / ".pymailsrv").check_password("alice", "new")
    result = cli("user", "passwd", "nobody", "--password-stdin", input="x\n")
    assert result.exit_code == 1 and one_line_error(result) == "Error: no such user 'nobody'"


def test_purge_leaves_what_a_symlinked_maildir_points_to_and_says_so(cli, root, tmp_path):
    cli("user", "add", "bob", "--password-stdin", input="pw\n")
    elsewhere = tmp_path / "elsewhere"
    (root / "bob").rename(elsewhere)
    (root / "bob").symlink_to(elsewhere)
    result = cli("user", "remove", "bob", "--purge")
    assert result.exit_code == 1
    assert one_line_error(result) == (f"Error: removed user bob, but not their mail: {root / 'bob'} is a "
                                      "symbolic link: what it points to is left alone")
    assert (elsewhere / "new").is_dir() and UserStore(root / ".pymailsrv").names() == []


def test_a_new_account_is_told_of_the_mail_an_old_one_of_its_name_left(cli, root):
    cli("user", "add", "bob", "--password-stdin", input="pw\n")
    MaildirStore(root).deliver("bob", MESSAGE)
    cli("user", "remove", "bob")  # the mail stays, as the help says
    result = cli("user", "add", "bob", "--password-stdin", input="pw2\n")
    assert (result.exit_code, result.stdout) == (0, "added user bob\n")
    assert result.stderr == ("note: bob's Maildir already holds 1 message, left by an earlier account of "
                             "that name; bob will see them\n")


def test_user_list_is_a_table_of_users_messages_and_bytes(cli, root):
    for name in ("bob", "alice"):
        cli("user", "add", name, "--password-stdin", input="pw\n")
    store = MaildirStore(root)
    store.deliver("alice", MESSAGE)
    store.deliver("alice", b"Subject: x\n\ny\n")
    result = cli("user", "list")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["user", "messages", "bytes"]
    assert set("".join(rows[1])) == {"-"}
    assert rows[2:] == [["alice", "2", str(len(MESSAGE) + 14)], ["bob", "0", "0"]]


def test_user_list_shows_a_broken_maildir_in_its_row_and_lists_the_rest(cli, root):
    for name in ("alice", "bob"):
        cli("user", "add", name, "--password-stdin", input="pw\n")
    shutil.rmtree(root / "alice" / "new")
    (root / "alice" / "new").write_bytes(b"not a directory")
    result = cli("user", "list")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert rows == [["alice", "(cannot", "read:", "Not", "a", "directory)"], ["bob", "0", "0"]]


@pytest.mark.parametrize("name, record, said", [
    ("Bob Smith", {"password": "$scrypt$"}, "'Bob Smith' is not a user name"),
    ("../evil", {"password": "$scrypt$"}, "'../evil' is not a user name"),
    ("bob", {"password": 5}, "the record of 'bob' is not a password and its options"),
    ("bob", {}, "the record of 'bob' is not a password and its options"),
    ("bob", {"password": "$scrypt$", "apop_secret": None}, "the record of 'bob' is not a password and its options"),
    # An empty APOP secret would let anyone log in as bob: the digest of the timestamp alone matches.
    ("bob", {"password": "$scrypt$", "apop_secret": ""}, "the APOP secret of 'bob': the password may not be empty"),
])
def test_a_record_put_into_users_json_by_hand_is_checked_as_user_add_checks(cli, root, name, record, said):
    cli("user", "add", "alice", "--password-stdin", input="pw\n")
    users_file = root / ".pymailsrv" / "users.json"
    table = json.loads(users_file.read_text())
    table["users"][name] = record
    users_file.write_text(json.dumps(table))
    result = cli("user", "list")
    assert result.exit_code == 1
    assert one_line_error(result) == f"Error: {users_file} is damaged: {said}"


def test_mailbox_list_is_a_table_of_messages(cli, root):
    cli("user", "add", "alice", "--password-stdin", input="pw\n")
    store = MaildirStore(root)
    store.deliver("alice", MESSAGE)
    (info, _), = store.messages("alice")
    result = cli("mailbox", "list", "alice")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["#", "uid", "date", "from", "subject", "size"]
    row = lines[2]
    assert row.split()[:2] == ["1", info.uid]
    assert "Mon, 01 Jan 2024 10:00:00 +0000" in row or "Mon, 1 Jan 2024 10:00:00 +0000" in row
    assert "Bob <bob@example.org>" in row and "Hello there" in row
    assert row.split()[-1] == str(info.size) == str(len(MESSAGE.replace(b"\n", b"\r\n")))
    result = cli("mailbox", "list", "nobody")
    assert result.exit_code == 1 and one_line_error(result) == "Error: no such user 'nobody'"


def test_mailbox_list_and_show_escape_control_characters_from_the_message(cli, root):
    # An encoded word is the easy way to smuggle ESC and CSI (U+009B) past
    # SMTP: decoded, they would recolour or clear the reader's terminal.
    cli("user", "add", "alice", "--password-stdin", input="pw\n")
    MaildirStore(root).deliver("alice", b"From: a@example.org\nSubject: =?utf-8?b?" +
                               base64.b64encode("red\x1b[31m\u009b2J".encode()) + b"?=\n\nbody \x1b]0;x\x07\n")
    for command in (("mailbox", "list", "alice"), ("mailbox", "show", "alice", "1")):
        result = cli(*command)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.stdout and "\u009b" not in result.stdout and "\x07" not in result.stdout
        assert "red\\x1b[31m\\u009b2J" in result.stdout
    # Escaped before the columns were measured: each row as wide as the header.
    lines = cli("mailbox", "list", "alice").stdout.splitlines()
    assert len({len(line) for line in lines}) == 1, lines


# --- deliver (a local delivery agent: sysexits) ------------------------------------------


def test_deliver_from_a_file_and_from_stdin(cli, root, tmp_path):
    cli("user", "add", "alice", "--password-stdin", input="pw\n")
    message_file = tmp_path / "message.eml"
    message_file.write_bytes(MESSAGE)
    result = cli("deliver", "alice", str(message_file))
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"delivered to alice as [0-9A-F]{10}\n", result.stdout)
    result = cli("deliver", "alice", input=b"Subject: from stdin\n\nbody\n")
    assert result.exit_code == 0, result.output
    bodies = sorted(path.read_bytes() for _, path in MaildirStore(root).messages("alice"))
    assert bodies == sorted([MESSAGE, b"Subject: from stdin\n\nbody\n"])


def test_deliver_to_an_unknown_or_invalid_user_is_ex_nouser(cli, root):
    cli("user", "add", "alice", "--password-stdin", input="pw\n")
    for name in ("nobody", "../x"):
        result = cli("deliver", name, input=MESSAGE)
        assert result.exit_code == EX_NOUSER == 67
        assert one_line_error(result).startswith("Error: ")
    assert sorted(path.name for path in root.iterdir()) == [".pymailsrv", "alice"]  # no Maildir made for them


def test_deliver_with_a_broken_config_or_no_data_root_is_ex_tempfail(cli, root, tmp_path):
    # An MTA bounces on any status but 75: these are for the admin to fix,
    # and the message waits meanwhile.
    (tmp_path / "broken.toml").write_text("[smtp\n")
    result = cli("deliver", "alice", "--config", str(tmp_path / "broken.toml"), input=MESSAGE)
    assert result.exit_code == EX_TEMPFAIL
    assert one_line_error(result).startswith("Error: cannot deliver now, try again later: config file ")
    result = cli("deliver", "alice", "--root", str(tmp_path / "not-mounted"), input=MESSAGE, root_option=False)
    assert result.exit_code == EX_TEMPFAIL
    assert one_line_error(result) == ("Error: cannot deliver now, try again later: no data root at "
                                      f"{tmp_path / 'not-mounted'}")
    # A data root with no users: the empty mount point of one not mounted yet.
    # It used to be 'no such user', EX_NOUSER, and the MTA bounced the mail.
    result = cli("deliver", "alice", input=MESSAGE)
    assert result.exit_code == EX_TEMPFAIL
    assert one_line_error(result) == (f"Error: cannot deliver now, try again later: no users at {root} "
                                      "(is the data root mounted?)")


def test_deliver_of_an_empty_message_is_ex_dataerr(cli, root):
    cli("user", "add", "alice", "--password-stdin", input="pw\n")
    result = cli("deliver", "alice", input=b"\n \n")
    assert result.exit_code == EX_DATAERR == 65
    assert one_line_error(result) == "Error: the message is empty"
    assert os.listdir(root / "alice" / "tmp") == os.listdir(root / "alice" / "new") == []


def test_deliver_with_its_standard_input_closed_is_ex_tempfail_in_one_line(root, clean_environment):
    # click could not open the closed stdin, and said so with a traceback.
    UserStore(root / ".pymailsrv").add("alice", "pw")
    MaildirStore(root).create_maildir("alice")
    result = subprocess.run([sys.executable, "-m", "pymailsrv", "deliver", "alice", "--root", str(root)],
                            capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.close(0))
    assert result.returncode == EX_TEMPFAIL
    assert result.stderr == "Error: cannot deliver now, try again later: no message (standard input is closed)\n"


def test_deliver_when_the_maildir_is_broken_is_ex_tempfail(cli, root):
    cli("user", "add", "alice", "--password-stdin", input="pw\n")
    (root / "alice" / "tmp").rmdir()
    (root / "alice" / "tmp").write_bytes(b"")  # not a directory any more
    result = cli("deliver", "alice", input=MESSAGE)
    assert result.exit_code == EX_TEMPFAIL == 75
    assert one_line_error(result).startswith("Error: cannot deliver now, try again later")


@pytest.mark.parametrize("damage", [b"{", b"", b"[]", b'{"nousers": 1}', b'{"users": {"alice": 1}}',
                                    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-too-deep")])
def test_a_damaged_user_file_is_one_line_and_deliver_tempfails(cli, root, damage):
    cli("user", "add", "alice", "--password-stdin", input="pw\n")
    (root / ".pymailsrv" / "users.json").write_bytes(damage)
    for command in (("user", "list"), ("user", "add", "bob", "--password-stdin"), ("mailbox", "list", "alice")):
        result = cli(*command, input="pw\n")
        assert result.exit_code == 1
        assert re.fullmatch(r"Error: .*users\.json is damaged: .+", one_line_error(result))
    result = cli("deliver", "alice", input=MESSAGE)
    assert result.exit_code == EX_TEMPFAIL
    assert one_line_error(result).startswith("Error: cannot deliver now, try again later: ")
    assert (root / ".pymailsrv" / "users.json").read_bytes() == damage  # left for the admin to restore


def test_a_pop3_greeting_while_users_json_cannot_be_read_is_still_a_greeting(start_server, root, add_user):
    # Whether to offer APOP reads users.json: unreadable, there is no APOP,
    # and the greeting still comes (no login can succeed till it is mended).
    add_user("alice")
    server = start_server()
    (root / ".pymailsrv" / "users.json").unlink()
    (root / ".pymailsrv" / "users.json").mkdir()  # unreadable as a file, even to root
    client = poplib.POP3(*server.addresses["pop3"], timeout=CLIENT_TIMEOUT)
    try:
        assert client.getwelcome() == b"+OK pymailsrv POP3 server ready"
    finally:
        client.close()


@pytest.mark.parametrize("command", [("user", "add", "bob", "--password-stdin"), ("user", "remove", "bob"),
                                     ("cert", "generate")])
def test_a_data_root_below_a_file_is_one_line(cli, tmp_path, command):
    (tmp_path / "a-file").write_bytes(b"")
    result = cli(*command, "--root", str(tmp_path / "a-file" / "root"), input="pw\n", root_option=False)
    assert result.exit_code == 1
    assert re.fullmatch(r"Error: cannot use .*a-file/root/\S*: Not a directory", one_line_error(result))


@pytest.mark.parametrize("command", [("user", "list"), ("alias", "list"), ("queue", "list"), ("queue", "flush"),
                                     ("transcripts", "list"), ("classroom", "reset"), ("grade", "--all"),
                                     ("mailbox", "list", "bob"), ("mailbox", "show", "bob", "1"),
                                     ("queue", "delete", "0123456789ABCDEF")])
def test_a_command_that_only_reads_says_when_there_is_no_data_root(cli, tmp_path, command):
    # A mistyped --root: an empty listing, exit 0, would hide the typo.
    result = cli(*command, "--root", str(tmp_path / "mailbxes"), root_option=False)
    assert result.exit_code == 1
    assert one_line_error(result) == (f"Error: no data root at {tmp_path / 'mailbxes'} "
                                      "(is --root right? 'user add' makes one)")
    assert not (tmp_path / "mailbxes").exists()


def test_deliver_below_a_file_is_ex_tempfail(cli, tmp_path):
    (tmp_path / "a-file").write_bytes(b"")
    result = cli("deliver", "alice", "--root", str(tmp_path / "a-file" / "root"), input=MESSAGE, root_option=False)
    assert result.exit_code == EX_TEMPFAIL
    assert one_line_error(result).startswith("Error: cannot deliver now, try again later: ")


def test_user_add_over_a_file_in_the_maildirs_place_adds_no_user(cli, root):
    root.mkdir(exist_ok=True)
    (root / "frank").write_bytes(b"")
    result = cli("user", "add", "frank", "--password-stdin", input="pw\n")
    assert result.exit_code == 1
    assert re.fullmatch(r"Error: cannot use .*/frank: Not a directory", one_line_error(result))  # the file itself
    assert not UserStore(root / ".pymailsrv").exists("frank")
    cli("user", "add", "alice", "--password-stdin", input="pw\n")
    assert cli("user", "list").exit_code == 0


def test_usage_errors_are_exit_2(cli):
    assert cli("deliver").exit_code == 2
    assert cli("user", "add").exit_code == 2
    assert cli("deliver", "alice", "/no/such/file").exit_code == 2
    assert cli("no-such-command", root_option=False).exit_code == 2


# --- where the root comes from ------------------------------------------------------------


def test_root_comes_from_the_environment_when_not_given(root, monkeypatch):
    monkeypatch.setenv("PYMAILSRV_ROOT", str(root))
    result = CliRunner().invoke(main, ["user", "add", "alice", "--password-stdin"], input="pw\n")
    assert result.exit_code == 0, result.output
    assert UserStore(root / ".pymailsrv").exists("alice")


def test_root_flag_wins_over_the_environment(root, tmp_path, monkeypatch):
    monkeypatch.setenv("PYMAILSRV_ROOT", str(tmp_path / "elsewhere"))
    result = CliRunner().invoke(main, ["user", "add", "alice", "--password-stdin", "--root", str(root)],
                                input="pw\n")
    assert result.exit_code == 0, result.output
    assert (root / "alice").is_dir() and not (tmp_path / "elsewhere").exists()


def test_default_root_is_mailboxes_in_the_working_directory(tmp_path):
    result = CliRunner().invoke(main, ["user", "add", "alice", "--password-stdin"], input="pw\n")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mailboxes" / "alice" / "new").is_dir()


def test_unknown_key_in_the_config_file_is_one_line_naming_it(cli, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[pop3]\nport = 110\nautologut = 5\n')
    result = cli("user", "list", "--config", str(config))
    assert result.exit_code == 1
    assert one_line_error(result) == f"Error: unknown setting 'pop3.autologut' in {str(config)!r}"


def test_config_file_is_found_in_the_working_directory(cli, tmp_path):
    (tmp_path / "pymailsrv.toml").write_text('bogus = 1\n')
    result = cli("user", "list")
    assert result.exit_code == 1
    # Named, for it was found, not given.
    assert one_line_error(result) == "Error: unknown setting 'bogus' in 'pymailsrv.toml'"


# --- real subprocesses ---------------------------------------------------------------------


def run_cli(*args: str, input: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pymailsrv", *args], input=input, capture_output=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_user_add_and_deliver_as_real_processes(root):
    added = run_cli("user", "add", "alice", "--password-stdin", "--root", str(root), input=b"pw\n")
    assert (added.returncode, added.stdout, added.stderr) == (0, b"added user alice\n", b"")
    again = run_cli("user", "add", "alice", "--password-stdin", "--root", str(root), input=b"pw\n")
    assert (again.returncode, again.stderr) == (1, b"Error: user 'alice' already exists\n")
    delivered = run_cli("deliver", "alice", env={"PYMAILSRV_ROOT": str(root)}, input=MESSAGE)
    assert delivered.returncode == 0, delivered.stderr
    missing = run_cli("deliver", "nobody", "--root", str(root), input=MESSAGE)
    assert (missing.returncode, missing.stderr) == (67, b"Error: no such user 'nobody'\n")
    assert len(MaildirStore(root).messages("alice")) == 1


def test_a_password_piped_without_password_stdin_says_what_to_give(root):
    added = run_cli("user", "add", "zed", "--root", str(root), input=b"pw\n")  # one line: no confirmation
    assert added.returncode == 1 and b"Traceback" not in added.stderr
    assert added.stderr.splitlines()[-1].endswith(
        b"Error: no password given: type it twice at the prompt, or give --password-stdin and the password on stdin")
    assert UserStore(root / ".pymailsrv").names() == []


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_a_password_that_is_not_utf8_is_refused(root, locale):
    # Python reads stdin's stray octets as lone surrogates (in the C locale
    # and others); stored, they would make every APOP login fail with 451.
    added = run_cli("user", "add", "zed", "--password-stdin", "--root", str(root), input=b"\xff\xfe\n",
                    env={"LC_ALL": locale})
    assert (added.returncode, added.stderr) == (1, b"Error: the password must be UTF-8 text\n")
    assert UserStore(root / ".pymailsrv").names() == []


# The modules whose commands cli.py registers: each must import on its own,
# first, in a fresh interpreter, which an import cycle through cli.py breaks.
COMMAND_MODULES = ["transcripts", "grade", "grade_criteria", "classroom", "probe", "explain", "mailview",
                   "cli_relay"]


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_a_command_module_imports_on_its_own(module):
    imported = subprocess.run([sys.executable, "-c", f"import pymailsrv.{module}"], capture_output=True,
                              timeout=60)
    assert (imported.returncode, imported.stderr) == (0, b"")


def test_start_imports_no_other_command_no_table_maker_and_no_dns():
    # Start-up counts (issue 9: listening within 0.5 s), so the commands kept
    # in their own modules, tabulate and dnspython are imported only when used.
    others = sorted({f"pymailsrv.{module}" for module in COMMAND_MODULES} | {"tabulate", "dns"})
    code = (f"import sys, pymailsrv.cli, pymailsrv.server, pymailsrv.workers; "
            f"print(sorted(set(sys.modules) & set({others!r})))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert (imported.returncode, imported.stdout, imported.stderr) == (0, b"[]\n", b"")


def test_transcripts_help_as_a_real_process():
    shown = run_cli("transcripts", "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == b"Usage: python -m pymailsrv transcripts [OPTIONS] COMMAND [ARGS]..."


class RunningServer:
    """``python -m pymailsrv start`` as a child process, with what it logs to stderr kept."""

    def __init__(self, root: Path) -> None:
        self.process = start_process(root)
        self.stderr: list[bytes] = []

    def wait_for_listening(self) -> tuple[str, int]:
        line = listening_line(self.process, self.stderr)
        match = re.fullmatch(rb"listening pop3=(127\.0\.0\.1):(\d+) smtp=127\.0\.0\.1:\d+\n", line)
        assert match, line
        return match.group(1).decode(), int(match.group(2))

    def signal(self, number: int) -> tuple[int, bytes]:
        self.process.send_signal(number)
        _, rest = self.process.communicate(timeout=START_TIMEOUT)
        return self.process.returncode, b"".join(self.stderr) + rest

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=START_TIMEOUT)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])  # HUP: a closed terminal
def test_start_serves_pop3_and_stops_cleanly_on_signal(root, stop_signal):
    added = run_cli("user", "add", "alice", "--password-stdin", "--root", str(root), input=b"pw\n")
    assert added.returncode == 0
    run_cli("deliver", "alice", "--root", str(root), input=MESSAGE)
    server = RunningServer(root)
    try:
        host, port = server.wait_for_listening()
        client = poplib.POP3(host, port, timeout=CLIENT_TIMEOUT)
        client.user("alice")
        assert client.pass_("pw") == f"+OK alice's maildrop has 1 message ({len(MESSAGE) + 5} octets)".encode()
        assert client.retr(1)[1][1] == b"Subject: Hello there"
        client.quit()
        status, stderr = server.signal(stop_signal)
    finally:
        server.stop()
    assert status == 0, stderr
    assert b"Traceback" not in stderr
    assert b"Aborted!" not in stderr
    assert sum(line.startswith(b"listening ") for line in stderr.splitlines()) == 1


def test_ctrl_c_while_the_modules_load_is_aborted_without_a_traceback(tmp_path):
    # Ctrl-C in start's first quarter second came while cli.py was still being
    # imported, before click could make it "Aborted!", and printed a traceback.
    # A click that raises KeyboardInterrupt as it loads stands in for that moment.
    (tmp_path / "click.py").write_text("raise KeyboardInterrupt\n")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    result = run_cli("start", env={"PYTHONPATH": path})
    assert (result.returncode, result.stdout, result.stderr) == (1, b"", b"\nAborted!\n")


def test_start_on_a_port_in_use_is_exit_1_without_a_traceback(root):
    import socket

    run_cli("user", "add", "alice", "--password-stdin", "--root", str(root), input=b"pw\n")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli("start", "--root", str(root), "--pop3-port", str(port), "--smtp-port", "0")
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (f"Error: cannot listen on 127.0.0.1 port {port} (pop3): "
                                              "Address already in use").encode()


def test_two_listeners_given_one_port_are_named(root):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as probe:  # a port free a moment ago
        port = str(probe.getsockname()[1])
    result = run_cli("start", "--root", str(root), "--pop3-port", port, "--smtp-port", port)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (f"Error: cannot listen on 127.0.0.1 port {port} (smtp): "
                                              "Address already in use").encode()


@pytest.mark.parametrize("name, make, kind", [
    ("queue", lambda path: path.write_bytes(b""), "a directory"),
    ("aliases", lambda path: path.mkdir(), "a file"),
])
def test_start_with_the_wrong_kind_of_entry_in_the_state_directory_is_one_line(root, name, make, kind):
    # A file for the queue gave a traceback at the relay's start (a crash loop
    # with workers); a directory for aliases, a 451 and a traceback at each RCPT.
    run_cli("user", "add", "alice", "--password-stdin", "--root", str(root), input=b"pw\n")
    make(root / ".pymailsrv" / name)
    result = run_cli("start", "--root", str(root), "--pop3-port", "0", "--smtp-port", "0")
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"Error: {str(root / '.pymailsrv' / name)!r} must be {kind}: move it out of the way").encode()


@pytest.mark.parametrize("damage, problem", [
    (lambda path: path.write_bytes(b"{"), rb"is damaged: .+"),
    (lambda path: (path.unlink(), path.mkdir()), rb"cannot be read: Is a directory; .+"),
], ids=["not JSON", "a directory"])
def test_start_with_a_damaged_user_file_is_exit_1_without_a_traceback(root, damage, problem):
    run_cli("user", "add", "alice", "--password-stdin", "--root", str(root), input=b"pw\n")
    damage(root / ".pymailsrv" / "users.json")
    result = run_cli("start", "--root", str(root), "--pop3-port", "0", "--smtp-port", "0")
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    assert re.fullmatch(rb"Error: .*users\.json " + problem, result.stderr.splitlines()[-1])


def test_output_cut_short_by_its_reader_is_no_error(root, start_server):
    # `pymailsrv transcripts show ID | head -1` printed "Error: [Errno 32] Broken pipe".
    server = start_server(transcripts=True)
    with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
        for _ in range(3000):  # a transcript longer than a pipe holds
            client.noop()
    server.stop()
    [transcript] = (root / ".pymailsrv" / "transcripts").iterdir()
    reader = subprocess.run(f"{sys.executable} -m pymailsrv transcripts show {transcript.stem} --root {root} | head -1",
                            shell=True, capture_output=True, text=True, timeout=60)
    assert reader.stdout == "smtp session 1 from 127.0.0.1\n"
    assert reader.stderr == ""
