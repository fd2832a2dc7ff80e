"""``pymailsrv classroom``: accounts students can log in with, and a reset between lessons."""

from __future__ import annotations

import csv
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from pymailsrv.classroom import PASSWORD_ALPHABET, generate_password, is_student, student_names
from pymailsrv.cli import main
from tests.conftest import PASSWORD, wait_until

SHEET_HEADERS = ["user", "password", "address", "SMTP server", "POP3 server"]


def classroom(root, *args: str, input: str | None = None):
    command, *rest = args
    return CliRunner().invoke(main, ["classroom", command, "--root", str(root), *rest], input=input)


def sheet_rows(output: str) -> list[list[str]]:
    """The rows of the printed sheet (tabulate's "simple" table: header, dashes, rows)."""
    lines = output.splitlines()
    assert lines[0].split() == ["user", "password", "address", "SMTP", "server", "POP3", "server"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    return [line.split() for line in lines[2:]]


def test_setup_creates_accounts_that_log_in_over_pop3_with_the_printed_password(root, pop3):
    result = classroom(root, "setup", "--students", "3")
    assert result.exit_code == 0, result.output
    rows = sheet_rows(result.stdout)
    assert [row[0] for row in rows] == ["student01", "student02", "student03"]
    for user, password, address, smtp, pop3_server in rows:
        assert address == f"{user}@localhost"
        assert (smtp, pop3_server) == ("127.0.0.1:2525", "127.0.0.1:1100")  # the defaults
        assert (root / user / "new").is_dir()
        client = pop3()
        client.user(user)
        assert client.pass_(password).startswith(b"+OK")
        client.quit()
    assert len({row[1] for row in rows}) == 3, "every student gets their own password"


def test_a_setup_stopped_part_way_still_shows_the_passwords_it_made(root, users):
    # student03's Maildir cannot be made: a file is in its place.
    (root / "student03").write_bytes(b"not a directory")
    result = classroom(root, "setup", "--students", "5")
    assert result.exit_code == 1
    assert [row[0] for row in sheet_rows(result.stdout)] == ["student01", "student02"]
    assert result.stderr.startswith("Error: stopped after 2 accounts: ")
    assert result.stderr.rstrip().endswith("; the sheet above holds their passwords")
    assert users.names() == ["student01", "student02"]  # student03 is no account without its Maildir
    (root / "student03").unlink()
    again = classroom(root, "setup", "--students", "5")
    assert [row[0] for row in sheet_rows(again.stdout)] == ["student03", "student04", "student05"]


def test_sheet_shows_the_configured_domain_host_and_ports(root, tmp_path):
    config = tmp_path / "class.toml"
    config.write_text('host = "192.0.2.10"\ndomains = ["school.example", "other.example"]\n'
                      "[smtp]\nport = 2626\n[pop3]\nport = 1110\n")
    result = classroom(root, "setup", "--students", "1", "--config", str(config))
    assert sheet_rows(result.stdout)[0][2:] == ["student01@school.example", "192.0.2.10:2626",
                                                "192.0.2.10:1110"]


def test_csv_holds_the_same_rows_and_only_its_owner_may_read_it(root, tmp_path):
    sheet = tmp_path / "sheet.csv"
    result = classroom(root, "setup", "--students", "2", "--csv", str(sheet))
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(sheet.stat().st_mode) == 0o600
    with open(sheet, newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert rows[0] == SHEET_HEADERS
    assert rows[1:] == sheet_rows(result.stdout)


def test_shared_password_from_stdin(root, pop3):
    result = classroom(root, "setup", "--students", "2", "--password-stdin", input="lesson one\n")
    assert result.exit_code == 0, result.output
    for user in ("student01", "student02"):
        client = pop3()
        client.user(user)
        assert client.pass_("lesson one").startswith(b"+OK")
        client.quit()


def test_existing_accounts_are_skipped_with_their_password_unchanged(root, add_user, users):
    add_user("student02")
    result = classroom(root, "setup", "--students", "3")
    assert result.exit_code == 0, result.output
    assert [row[0] for row in sheet_rows(result.stdout)] == ["student01", "student03"]
    assert "note: student02 already exists: skipped, password unchanged\n" in result.stderr
    assert users.check_password("student02", PASSWORD)


def test_prefix_and_zero_padding_follow_the_class_size(root, users):
    result = classroom(root, "setup", "--students", "3", "--prefix", "Lab")
    assert result.exit_code == 0, result.output
    assert users.names() == ["lab01", "lab02", "lab03"]
    assert student_names("s", 9)[-1] == "s09"
    assert student_names("s", 120)[:1] + student_names("s", 120)[-1:] == ["s001", "s120"]


def test_an_empty_prefix_or_a_class_past_the_cap_is_refused(root, users):
    result = classroom(root, "setup", "--students", "2", "--prefix", "")
    assert result.exit_code == 1
    assert result.output == "Error: give a prefix: user names are the prefix, then a number\n"
    result = classroom(root, "setup", "--students", "1001")
    assert result.exit_code == 2 and "1001 is not in the range 1<=x<=1000" in result.output
    assert users.names() == []


def test_a_prefix_that_makes_bad_names_is_a_one_line_error(root):
    result = classroom(root, "setup", "--students", "2", "--prefix", "../x")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("Error: prefix '../x'")


def test_passwords_are_three_groups_from_the_unambiguous_alphabet():
    password = generate_password()
    groups = password.split("-")
    assert [len(group) for group in groups] == [4, 4, 4]
    assert set("".join(groups)) <= set(PASSWORD_ALPHABET)
    assert not set("0o1li") & set(PASSWORD_ALPHABET)


def test_reset_empties_student_mailboxes_only(root, add_user, store):
    for name in ("student01", "student02", "teacher"):
        add_user(name)
    store.deliver("student01", b"Subject: a\n\nx\n")
    store.deliver("student01", b"Subject: b\n\nx\n")
    store.deliver("student02", b"Subject: c\n\nx\n")
    store.deliver("teacher", b"Subject: d\n\nx\n")
    result = classroom(root, "reset")
    assert result.exit_code == 0, result.output
    assert result.output == "removed 3 messages from 2 mailboxes\n"
    assert store.messages("student01") == store.messages("student02") == []
    assert len(store.messages("teacher")) == 1


def test_reset_leaves_a_mailbox_alone_while_its_student_is_logged_in(root, add_user, store, pop3):
    add_user("student01")
    add_user("student02")
    store.deliver("student01", b"Subject: a\n\nx\n")
    store.deliver("student02", b"Subject: b\n\nx\n")
    client = pop3()
    client.user("student01")
    client.pass_(PASSWORD)  # holds the maildrop lock (RFC 1939 §4)
    result = classroom(root, "reset")
    assert result.exit_code == 0, result.output
    assert "note: student01 is logged in over POP3: mailbox left as it is\n" in result.stderr
    assert result.stdout == "removed 1 message from 1 mailbox\n"
    assert len(store.messages("student01")) == 1
    assert client.stat() == (1, 17)  # the session's snapshot is intact
    client.quit()


@pytest.mark.parametrize("name, prefix, expected", [
    ("student01", "student", True),
    ("student123", "student", True),
    ("student", "student", False),
    ("student01x", "student", False),
    ("studentteacher", "student", False),
    ("lab01", "Lab", True),
])
def test_which_users_count_as_students(name, prefix, expected):
    assert is_student(name, prefix) is expected


def test_an_empty_csv_name_is_refused_before_any_account_exists(root, users):
    result = classroom(root, "setup", "--students", "2", "--csv", "")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == "Error: Invalid value for '--csv': give a file name"
    assert users.names() == []


def test_students_must_be_at_least_one(root):
    assert classroom(root, "setup", "--students", "0").exit_code == 2


def test_a_setup_stopped_at_the_first_account_prints_no_sheet(root, users):
    (root / "student01").write_bytes(b"not a directory")
    result = classroom(root, "setup", "--students", "2")
    assert result.exit_code == 1
    assert result.stdout == ""  # no empty sheet, and no "the sheet above"
    assert result.stderr.startswith("Error: no account made: ") and "sheet" not in result.stderr
    assert users.names() == []


@pytest.mark.parametrize("where", ["no-such-dir/sheet.csv", "."])
def test_a_csv_path_that_cannot_be_written_is_refused_before_any_account_exists(root, users, tmp_path, where):
    sheet = tmp_path / where
    result = classroom(root, "setup", "--students", "2", "--csv", str(sheet))
    assert result.exit_code == 2
    assert result.stdout == ""
    expected = (f"Error: Invalid value for '--csv': no directory {sheet.parent} to write into" if where != "."
                else f"Error: Invalid value for '--csv': File '{sheet}' is a directory.")
    assert result.stderr.splitlines()[-1] == expected
    assert users.names() == []
    assert [path.name for path in root.iterdir() if path.name != ".pymailsrv"] == []


def test_an_existing_csv_file_is_refused_before_any_account_exists(root, users, tmp_path):
    # Written over, an earlier run's sheet lost passwords kept nowhere else.
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("user,password\nstudent01,k7dm-q3xa-9fpe\n")
    result = classroom(root, "setup", "--students", "2", "--csv", str(sheet))
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (f"Error: Invalid value for '--csv': {sheet} is already there: "
                                              "give a new file name")
    assert sheet.read_text() == "user,password\nstudent01,k7dm-q3xa-9fpe\n"
    assert users.names() == []


def test_the_sheet_writes_an_ipv6_host_in_brackets(root, tmp_path):
    config = tmp_path / "class.toml"
    config.write_text('host = "::1"\n')
    result = classroom(root, "setup", "--students", "1", "--config", str(config))
    assert sheet_rows(result.stdout)[0][3:] == ["[::1]:2525", "[::1]:1100"]


def test_setup_names_an_account_that_gets_mail_an_earlier_one_left(root, users, store):
    assert classroom(root, "setup", "--students", "1").exit_code == 0
    store.deliver("student01", b"Subject: last term\n\nsecret\n")
    users.remove("student01")  # as 'user remove' without --purge: the mail stays
    result = classroom(root, "setup", "--students", "1")
    assert result.exit_code == 0, result.output
    assert ("note: student01's Maildir already holds 1 message, left by an earlier account of that name; "
            "student01 will see them\n") in result.stderr


def test_setup_stopped_by_sigterm_still_prints_the_passwords_it_made(root, users):
    setup = subprocess.Popen([sys.executable, "-m", "pymailsrv", "classroom", "setup", "--root", str(root),
                              "--students", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # A password hash each (tens of milliseconds): well within the run.
        wait_until(lambda: len(users.names()) >= 2, seconds=30, what="two accounts made")
        setup.send_signal(signal.SIGTERM)
        stdout, stderr = setup.communicate(timeout=30)
    finally:
        setup.kill()
        setup.wait()
    assert setup.returncode == 1
    made = users.names()
    assert 2 <= len(made) < 1000
    assert [row[0] for row in sheet_rows(stdout)] == made
    assert stderr.startswith(f"Error: stopped after {len(made)} accounts: interrupted; ")


def test_a_closed_terminal_still_leaves_the_csv_of_the_accounts_made(root, users, tmp_path):
    # SIGHUP: the sheet was printed first, to a terminal no longer there,
    # and the failed write stopped setup before the CSV was written.
    sheet = tmp_path / "sheet.csv"
    setup = subprocess.Popen([sys.executable, "-m", "pymailsrv", "classroom", "setup", "--root", str(root),
                              "--students", "1000", "--csv", str(sheet)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(users.names()) >= 2, seconds=30, what="two accounts made")
        setup.stdout.close()  # the terminal goes: printing fails from now on
        setup.send_signal(signal.SIGHUP)
        setup.wait(timeout=30)
    finally:
        setup.kill()
        setup.wait()
    with open(sheet, newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert [row[0] for row in rows[1:]] == users.names()


def test_reset_goes_on_past_a_mailbox_it_cannot_open(root, add_user, store):
    for name in ("student01", "student02", "student03"):
        add_user(name)
        store.deliver(name, b"Subject: a\n\nx\n")
    shutil.rmtree(root / "student02")
    (root / "student02").write_bytes(b"not a directory")
    result = classroom(root, "reset")
    assert result.exit_code == 1
    assert result.stdout == "removed 2 messages from 2 mailboxes\n"
    assert "note: student02's mailbox could not be opened: left as it is (" in result.stderr
    assert result.stderr.splitlines()[-1] == "Error: 1 mailbox could not be opened"
    assert store.messages("student01") == store.messages("student03") == []


def test_reset_refuses_an_empty_prefix(root, add_user, store):
    add_user("2024")  # an all-digit name: "" and digits would take it for a student
    store.deliver("2024", b"Subject: a\n\nx\n")
    result = classroom(root, "reset", "--prefix", "")
    assert result.exit_code == 1
    assert result.stderr == "Error: give a prefix: user names are the prefix, then a number\n"
    assert len(store.messages("2024")) == 1
