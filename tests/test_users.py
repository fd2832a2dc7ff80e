"""The user store: names that stay one harmless path component, scrypt, atomic writes.

A user name becomes a directory under ROOT, so the name check is a security
boundary; the password file is rewritten atomically under a lock, and a
running server sees every change without a restart.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import stat
import threading

import pytest

from pymailsrv import replies as R
from pymailsrv import users as users_module
from pymailsrv.users import UserError, UserStore, check_user_name, hash_password, verify_password
from tests.conftest import PASSWORD, RawClient

PHC = re.compile(r"\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")


# --- names --------------------------------------------------------------------------


@pytest.mark.parametrize("name, lowered", [
    ("alice", "alice"), ("Alice", "alice"), ("BOB.SMITH", "bob.smith"), ("0", "0"),
    ("a-b_c.d", "a-b_c.d"), ("a" * 64, "a" * 64), ("a..b", "a..b"),
])
def test_valid_user_names_are_lower_cased(name, lowered):
    assert check_user_name(name) == lowered


@pytest.mark.parametrize("name", [
    "", ".", "..", ".pymailsrv", ".hidden", "-dash", "_under", "a/b", "../etc", "a\\b", "a\x00b",
    "a b", "a:b", "a@b", "a\n", "a" * 65,
    "\u212aelvin",  # KELVIN SIGN: lower() makes it an ASCII "k"
    "\u0430lice",  # CYRILLIC SMALL LETTER A
    "\uff41lice",  # FULLWIDTH LATIN SMALL LETTER A
    "\u0130stanbul",  # LATIN CAPITAL LETTER I WITH DOT ABOVE
    "caf\u00e9",
])
def test_invalid_user_names_are_refused(name):
    with pytest.raises(UserError, match="invalid user name"):
        check_user_name(name)


def test_the_refusal_is_one_line_even_for_a_name_with_a_newline():
    with pytest.raises(UserError) as refusal:
        check_user_name("evil\nname")
    assert "\n" not in str(refusal.value)


# --- passwords ----------------------------------------------------------------------


def test_password_hash_is_a_phc_scrypt_string_with_random_salt():
    first, second = hash_password("secret"), hash_password("secret")
    match = PHC.fullmatch(first)
    assert match, first
    assert match.groups()[:3] == ("14", "8", "1")
    assert first != second  # a new salt each time
    assert verify_password("secret", first) and verify_password("secret", second)
    assert not verify_password("Secret", first)


@pytest.mark.parametrize("stored", ["", "plain", "$scrypt$ln=14$x$y", "$md5$ln=1,r=1,p=1$AAAA$AAAA",
                                    "$scrypt$ln=x,r=8,p=1$AAAA$AAAA", "$scrypt$ln=70,r=8,p=1$AAAA$AAAA",
                                    "$scrypt$ln=-1,r=8,p=1$AAAA$AAAA"])
def test_a_malformed_stored_hash_never_verifies(stored):
    assert not verify_password("anything", stored)


def test_passwords_are_compared_in_constant_time(users, monkeypatch):
    users.add("alice", PASSWORD)
    compared = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(users_module.hmac, "compare_digest", spy)
    assert users.check_password("alice", PASSWORD)
    assert not users.check_password("alice", "wrong")
    assert len(compared) == 2


def test_unknown_user_is_checked_against_a_decoy_hash(users, monkeypatch):
    checked = []
    real = users_module.verify_password
    monkeypatch.setattr(users_module, "verify_password",
                        lambda password, phc: checked.append(phc) or real(password, phc))
    assert not users.check_password("nobody", PASSWORD)
    assert checked == [users_module._DECOY_HASH]


# --- the file ---------------------------------------------------------------------------


def test_users_file_is_mode_0600_and_holds_no_plain_password(users):
    users.add("alice", PASSWORD)
    assert stat.S_IMODE(os.stat(users.path).st_mode) == 0o600
    text = users.path.read_text()
    assert PASSWORD not in text
    assert PHC.fullmatch(json.loads(text)["users"]["alice"]["password"])


def test_apop_keeps_the_secret_only_when_asked(users):
    users.add("alice", PASSWORD, apop=True)
    users.add("bob", PASSWORD)
    assert users.apop_secret("alice") == PASSWORD
    assert users.apop_secret("bob") is None
    assert users.apop_secret("nobody") is None
    assert stat.S_IMODE(os.stat(users.path).st_mode) == 0o600


def test_every_change_replaces_the_file_atomically(users):
    users.add("alice", PASSWORD)
    inode = os.stat(users.path).st_ino
    users.add("bob", PASSWORD)
    assert os.stat(users.path).st_ino != inode  # renamed over, not rewritten in place
    assert sorted(path.name for path in users.state_dir.iterdir()) == ["users.json", "users.lock"]


def test_a_leftover_temporary_file_does_not_loosen_the_mode(users):
    users.state_dir.mkdir(parents=True)
    leftover = users.path.with_suffix(".tmp")
    leftover.write_text("{}")
    leftover.chmod(0o644)
    users.add("alice", PASSWORD)
    assert stat.S_IMODE(os.stat(users.path).st_mode) == 0o600


def test_add_keeps_a_name_as_the_file_must_hold_it(users):
    users.add("Alice", PASSWORD)  # else users.json would hold a name every later read refuses
    assert users.names() == ["alice"]
    with pytest.raises(UserError, match="invalid user name"):
        users.add("../evil", PASSWORD)


def test_add_remove_and_passwd(users):
    users.add("alice", PASSWORD, apop=True)
    with pytest.raises(UserError, match="already exists"):
        users.add("alice", "other")
    users.set_password("alice", "new secret")
    assert users.check_password("alice", "new secret") and not users.check_password("alice", PASSWORD)
    assert users.apop_secret("alice") == "new secret"
    users.remove("alice")
    assert users.names() == []
    with pytest.raises(UserError, match="no such user"):
        users.remove("alice")
    with pytest.raises(UserError, match="no such user"):
        users.set_password("alice", "x")


def test_concurrent_writers_from_separate_stores_lose_nothing(root):
    names = [f"user{n}" for n in range(6)]
    errors = []

    def add(name: str) -> None:
        try:
            UserStore(root / ".pymailsrv").add(name, PASSWORD)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=add, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert UserStore(root / ".pymailsrv").names() == names


def test_another_store_sees_changes_without_reopening(root):
    reader = UserStore(root / ".pymailsrv")
    writer = UserStore(root / ".pymailsrv")
    assert reader.names() == []
    writer.add("alice", PASSWORD)
    assert reader.exists("alice")
    writer.remove("alice")
    assert not reader.exists("alice")


# --- a running server -----------------------------------------------------------------------


def _login(address, name: str, password: str = PASSWORD) -> bytes:
    client = RawClient(address)
    try:
        client.line()
        client.command(f"USER {name}")
        reply = client.command(f"PASS {password}")
        client.command("QUIT")
        return reply
    finally:
        client.close()


def test_user_added_and_removed_while_the_server_runs(server, root, store):
    address = server.addresses["pop3"]
    assert _login(address, "carol") == R.POP3_AUTH_FAILED.head()[0].encode() + b"\r\n"
    users = UserStore(root / ".pymailsrv")  # as `pymailsrv user add` would, from outside
    users.add("carol", PASSWORD)
    store.create_maildir("carol")
    assert _login(address, "carol").startswith(b"+OK carol's maildrop has 0 messages")
    users.set_password("carol", "changed")
    assert _login(address, "carol", "changed").startswith(b"+OK")
    users.remove("carol")
    assert _login(address, "carol", "changed") == b"-ERR [AUTH] invalid user name or password\r\n"


def test_the_state_directory_a_first_user_add_makes_is_its_owners_alone(tmp_path):
    # 'user add' made .pymailsrv with the umask's 0755 and users.lock 0644:
    # the lock names and the aliases file were open to every local account.
    old_umask = os.umask(0o022)
    try:
        users = UserStore(tmp_path / ".pymailsrv")
        users.add("alice", "secret-enough")
    finally:
        os.umask(old_umask)
    state = tmp_path / ".pymailsrv"
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in [state, *state.iterdir()]} == {
        ".pymailsrv": 0o700, "users.json": 0o600, "users.lock": 0o600}
