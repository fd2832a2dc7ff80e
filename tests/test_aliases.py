"""The aliases file: parsing, recursive expansion with loop detection, edits, the CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pymailsrv.aliases import AliasError, AliasTable, Expansion
from pymailsrv.cli import main
from pymailsrv.users import UserStore


@pytest.fixture
def aliases(root, add_user) -> AliasTable:
    for name in ("alice", "bob", "carol"):
        add_user(name)
    return AliasTable(root / ".pymailsrv", UserStore(root / ".pymailsrv").names, domains=["example.com"])


def write(table: AliasTable, text: str) -> None:
    table.path.parent.mkdir(parents=True, exist_ok=True)
    table.path.write_text(text)


def test_an_alias_expands_to_users_and_outside_addresses(aliases):
    write(aliases, "staff: alice, bob\nsales: carol, orders@shop.example.net\n")
    assert aliases.expand("staff") == Expansion(users=("alice", "bob"))
    assert aliases.expand("Sales") == Expansion(users=("carol",), external=("orders@shop.example.net",))


def test_expansion_is_recursive_and_gives_each_target_once(aliases):
    write(aliases, "all: staff, team, x@example.net\nstaff: alice, bob\nteam: bob, carol, X@EXAMPLE.NET\n")
    # Breadth first: all's own targets before those of the aliases it names.
    assert aliases.expand("all") == Expansion(users=("alice", "bob", "carol"), external=("x@example.net",
                                                                                        "X@example.net"))


def test_a_user_is_a_user_and_an_unknown_name_goes_nowhere(aliases):
    assert aliases.expand("alice") == Expansion(users=("alice",))
    assert not aliases.expand("nobody")
    assert not aliases.expand("../etc")


def test_a_loop_is_logged_and_skipped_never_followed_forever(aliases, caplog):
    write(aliases, "ping: pong, keep@example.net\npong: ping\nself: self\n")
    with caplog.at_level(logging.WARNING, logger="pymailsrv.aliases"):
        expansion = aliases.expand("ping")
        assert not aliases.expand("self")
    assert expansion.external == ("keep@example.net",) and expansion.users == ()
    assert expansion.problems == ("alias loop: ping -> pong -> ping",)
    assert "alias loop: ping -> pong -> ping" in caplog.text


def test_an_alias_that_names_its_own_user_keeps_a_copy(aliases):
    write(aliases, "carol: carol, carol@home.example.org\n")
    assert aliases.expand("carol") == Expansion(users=("carol",), external=("carol@home.example.org",))


def test_an_address_in_our_own_domain_is_a_local_name(aliases):
    write(aliases, "boss: Alice@Example.COM\n")
    assert aliases.expand("boss") == Expansion(users=("alice",))


def test_a_quoted_address_in_our_own_domain_is_a_local_name(aliases):
    assert aliases.add("boss", ['"alice"@example.com']) == ["alice"]  # RFC 5321 §4.1.2


def test_the_quoted_and_plain_forms_of_one_outside_address_get_one_copy(aliases):
    # RFC 5321 §4.1.2: "all quoted forms MUST be treated as equivalent".
    write(aliases, 'ext: "x"@example.net, x@example.net, "a b"@example.net\n')
    assert aliases.expand("ext").external == ("x@example.net", '"a b"@example.net')


def test_editing_keeps_a_hand_edit_that_is_not_utf8_byte_for_byte(aliases):
    aliases.path.parent.mkdir(parents=True, exist_ok=True)
    aliases.path.write_bytes(b"# caf\xe9 team\nstaff: alice\n")
    assert aliases.add("staff", ["bob"]) == ["alice", "bob"]
    assert aliases.remove("staff", ["alice"]) == ["bob"]
    assert aliases.path.read_bytes() == b"# caf\xe9 team\nstaff: bob\n"


def test_an_unknown_target_is_reported(aliases):
    write(aliases, "team: alice, ghost\n")
    expansion = aliases.expand("team")
    assert expansion.users == ("alice",) and expansion.problems == ("team -> ghost: no such user or alias",)


def test_postmaster_and_abuse_exist_by_default(aliases, root):
    assert aliases.expand("postmaster") == Expansion(users=("alice",))  # the first user
    assert aliases.expand("ABUSE") == Expansion(users=("alice",))
    configured = AliasTable(root / ".pymailsrv", lambda: ["alice", "bob"], postmaster="bob")
    assert configured.expand("postmaster") == Expansion(users=("bob",))
    write(aliases, "abuse: carol\n")
    assert aliases.expand("abuse") == Expansion(users=("carol",))


def test_a_user_named_postmaster_or_abuse_gets_that_mail_itself(root, add_user):
    for name in ("alice", "abuse", "postmaster"):
        add_user(name)
    table = AliasTable(root / ".pymailsrv", UserStore(root / ".pymailsrv").names)
    assert table.expand("postmaster") == Expansion(users=("postmaster",))
    assert table.expand("abuse") == Expansion(users=("abuse",))


def test_a_line_ends_only_at_a_line_feed_not_at_a_unicode_separator(aliases):
    target = '"x\u2028evil: m@attacker.example\u2028y"@example.net'
    assert aliases.add("staff", [target]) == [target]
    assert aliases.table()["staff"] == [target]
    assert "evil" not in aliases.table()
    assert aliases.expand("staff") == Expansion(external=(target,))


def test_a_byte_order_mark_is_no_part_of_the_first_name(aliases):
    aliases.path.parent.mkdir(parents=True, exist_ok=True)
    aliases.path.write_bytes(b"\xef\xbb\xbfstaff: alice\n")
    assert aliases.expand("staff") == Expansion(users=("alice",))
    assert aliases.add("staff", ["bob"]) == ["alice", "bob"]
    assert aliases.path.read_bytes() == b"staff: alice, bob\n"


def test_alias_commands_need_a_data_root_that_is_there(tmp_path, clean_environment):
    for command in (["add", "staff", "alice"], ["remove", "staff"], ["list"]):
        result = CliRunner().invoke(main, ["alias", *command, "--root", str(tmp_path / "typo")])
        assert result.exit_code == 1
        assert result.output == f"Error: no data root at {tmp_path / 'typo'} (is --root right? 'user add' makes one)\n"
    assert not (tmp_path / "typo").exists()


def test_a_file_with_crlf_line_ends_reads_as_one_with_lf(aliases):
    write(aliases, "staff: alice,\r\n  bob\r\nsales: carol\r\n")
    assert aliases.expand("staff") == Expansion(users=("alice", "bob"))
    assert aliases.expand("sales") == Expansion(users=("carol",))


def test_a_chain_deeper_than_sendmails_limit_goes_nowhere_and_says_so(aliases, caplog):
    write(aliases, "".join(f"a{depth}: a{depth + 1}\n" for depth in range(10)) + "a10: alice\n")
    assert aliases.expand("a1") == Expansion(users=("alice",))  # ten aliases deep
    with caplog.at_level(logging.WARNING, logger="pymailsrv.aliases"):
        expansion = aliases.expand("a0")  # eleven
    assert not expansion
    assert expansion.problems == ("more than 10 aliases deep: " + " -> ".join(f"a{depth}" for depth in range(11)),)


def test_a_name_cut_short_down_a_deep_branch_is_followed_again_down_a_short_one(aliases):
    # x is met first nine aliases down, where the limit cuts its chain, then through short.
    deep = "".join(f"deep{n}: deep{n + 1}\n" for n in range(1, 8)) + "deep8: x\n"
    write(aliases, "top: deep1, short\n" + deep + "short: x\nx: y\ny: alice\n")
    assert aliases.expand("top").users == ("alice",)


def test_a_wide_table_is_expanded_once_per_alias_with_few_problems(aliases):
    # 270 aliases each naming the next 30: each reached by very many paths, and expanded once.
    write(aliases, "".join(f"a{n}: " + ", ".join(f"a{m}" for m in range(n + 1, min(n + 31, 270))) + "\n"
                           for n in range(269)) + "a269: alice\n")
    expansion = aliases.expand("a0")
    assert expansion.users == ("alice",)
    assert expansion.problems == ()  # a269 is ten aliases down by its shortest path: within the limit


def test_a_chain_of_a_thousand_is_no_traceback(aliases):
    write(aliases, "".join(f"a{depth}: a{depth + 1}\n" for depth in range(1200)) + "a1200: alice\n")
    assert not aliases.expand("a0")


def test_comments_continuations_and_bad_lines(aliases, caplog):
    write(aliases, "# who gets what\n\nlist: alice,   # the first\n  bob\nthis is not an alias\n"
                   "odd#name@example.net: x\nteam: a#b@example.net\n")
    with caplog.at_level(logging.WARNING, logger="pymailsrv.aliases"):
        assert aliases.expand("list") == Expansion(users=("alice", "bob"))
    assert aliases.expand("team").external == ("a#b@example.net",)
    assert "line 5 skipped" in caplog.text and "line 6 skipped" in caplog.text


def test_a_line_that_continues_a_skipped_one_is_skipped_too(aliases, caplog):
    # aliases(5): a line that starts with white space continues the one
    # before. After a bad line it was read as a name of its own: here it
    # defined "evil", sending mail for evil@ to an outside address.
    write(aliases, "  stray: alice\nBad Name!: alice\n  evil: root@elsewhere.example\nteam: alice\n")
    with caplog.at_level(logging.WARNING, logger="pymailsrv.aliases"):
        assert not aliases.expand("evil") and not aliases.expand("stray")
    assert aliases.expand("team").users == ("alice",)
    assert [line for line in (1, 2, 3) if f"line {line} skipped" in caplog.text] == [1, 2, 3]


def test_a_target_that_is_not_utf8_is_a_problem_not_another_address(aliases):
    aliases.path.parent.mkdir(parents=True, exist_ok=True)
    aliases.path.write_bytes(b"team: alice, caf\xe9@example.net\n")
    expansion = aliases.expand("team")
    assert (expansion.users, expansion.external) == (("alice",), ())
    assert "not valid UTF-8" in expansion.problems[0]


def test_a_change_on_disk_applies_at_once(aliases):
    write(aliases, "team: alice\n")
    assert aliases.expand("team").users == ("alice",)
    write(aliases, "team: alice, bob\n")  # an editor's save: same inode, new size
    assert aliases.expand("team").users == ("alice", "bob")


def test_add_and_remove_keep_the_rest_of_the_file_as_written(aliases):
    write(aliases, "# our aliases\nstaff:   alice   # in the office\nsales: carol\n")
    assert aliases.add("staff", ["bob", "alice"]) == ["alice", "bob"]
    assert aliases.add("new", ["x@example.net"]) == ["x@example.net"]
    assert aliases.remove("staff", ["alice@example.com"]) == ["bob"]
    assert aliases.remove("sales") == []
    assert aliases.path.read_text() == "# our aliases\nstaff: bob\nnew: x@example.net\n"
    assert aliases.remove("new", ["x@example.net"]) == []
    assert aliases.path.read_text() == "# our aliases\nstaff: bob\n"
    assert os.stat(aliases.path).st_mode & 0o777 == 0o644


def test_add_knows_a_target_by_any_of_its_spellings_as_remove_does(aliases):
    # 'Alice' and '"bob"@example.com' (hand-written) are alice and bob: add
    # wrote them a second time, which remove would have taken as one.
    write(aliases, 'staff: Alice, "bob"@example.com\n')
    assert aliases.add("staff", ["alice", "bob", "carol", "carol"]) == ["Alice", '"bob"@example.com', "carol"]
    assert aliases.path.read_text() == 'staff: Alice, "bob"@example.com, carol\n'
    assert aliases.add("sales", ["carol", "Carol", "carol@example.com"]) == ["carol"]  # a new alias too


@pytest.mark.parametrize("name, targets", [("../x", ["alice"]), ("ok", ["a b"]), ("ok", ["x@"]), ("ok", []),
                                           # Valid addresses that the file's "," and "#" would cut apart:
                                           ("ok", ['"sales, europe"@remote.example']),
                                           ("ok", ['"ops #1"@remote.example', "bob"])])
def test_bad_names_and_targets_are_refused(aliases, name, targets):
    with pytest.raises(AliasError):
        aliases.add(name, targets)
    assert not aliases.path.exists()


def test_removing_what_is_not_there_is_an_error(aliases):
    write(aliases, "staff: alice\n")
    with pytest.raises(AliasError):
        aliases.remove("nobody")
    with pytest.raises(AliasError):
        aliases.remove("staff", ["bob"])


def test_the_alias_commands(root, add_user):
    add_user("alice")
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(main, [*args, "--root", str(root)])

    assert run("alias", "add", "Team", "alice", "bob@example.net").output.strip() == "team: alice, bob@example.net"
    listing = run("alias", "list").output
    assert "team" in listing and "alice, bob@example.net" in listing
    assert "postmaster (default)" in listing and "abuse (default)" in listing
    assert run("alias", "remove", "team", "bob@example.net").output.strip() == "team: alice"
    assert run("alias", "remove", "team").output.strip() == "removed alias team"
    refused = run("alias", "add", "bad/name", "alice")
    assert refused.exit_code == 1 and "invalid name" in refused.output


def test_alias_add_warns_about_a_target_that_is_no_user_or_alias_but_adds_it(root, add_user):
    add_user("alice")
    runner = CliRunner()
    runner.invoke(main, ["alias", "add", "staff", "alice", "--root", str(root)])
    result = runner.invoke(main, ["alias", "add", "team", "staff", "ghost", "x@example.net", "Alice@localhost",
                                  "--root", str(root)])
    assert result.exit_code == 0
    assert result.stdout == "team: staff, ghost, x@example.net, alice\n"
    assert result.stderr == ("warning: 'ghost' is not a local user or alias; nothing is delivered to it "
                             "until it is one\n")


@pytest.mark.parametrize("argument", [b"caf\xe9", b"caf\xe9@example.net", b"x@caf\xe9.example"])
def test_alias_add_with_bytes_that_are_not_utf8_is_a_one_line_error(root, clean_environment, argument):
    """A real process: click hands such bytes over as lone surrogates, which UTF-8 cannot write."""
    for args, error in (([b"team", argument], b": not valid UTF-8"), ([argument, b"alice"], b"")):
        result = subprocess.run([sys.executable.encode(), b"-m", b"pymailsrv", b"alias", b"add", *args,
                                 b"--root", bytes(root)], capture_output=True, timeout=60)
        assert result.returncode == 1 and result.stdout == b""
        [line] = result.stderr.splitlines()
        assert line.startswith(b"Error: invalid ") and error in line
    assert not (root / ".pymailsrv" / "aliases").exists()
