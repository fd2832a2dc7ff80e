"""An embedded mail server for the tests of code that sends or fetches mail.

``MailServer`` starts SMTP and POP3 on 127.0.0.1, on free ports, over a
temporary data root, inside the test process (threads, no subprocess), and
stops and removes it all when the ``with`` block ends, whether the test
passed or not::

    from pymailsrv.testing import MailServer

    def test_welcome_mail_is_sent():
        with MailServer(users={"alice": "secret"}) as server:
            send_welcome("alice@localhost", server.host, server.smtp_port)
            [message] = server.wait_for_messages("alice", 1)
            assert message["Subject"] == "Welcome"

Installed with pymailsrv, the pytest plugin (``pytest_plugin.py``) offers the
same server as the ``mail_server`` fixture. ``faults`` takes fault scripts
(``faults.py``) such as ``"smtp:RCPT#2=452 4.2.2 mailbox full"``, to see how
the code under test copes with a server that says no.
"""

from __future__ import annotations

import email.policy
import tempfile
import time
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from types import TracebackType

from pymailsrv.config import check_seconds, load_settings
from pymailsrv.maildir import MaildirStore
from pymailsrv.server import MailServer as _Server
from pymailsrv.users import UserStore, add_account, check_user_name

# How often wait_for_messages looks at the Maildir while it waits.
POLL_SECONDS = 0.02
# The discard port on loopback: nothing listens there (or, if something
# does, it speaks no SMTP), so relayed mail stays in the queue.
CLOSED_LOOPBACK_PORT = "127.0.0.1:9"


def check_arguments(users: object = None, domains: object = (), faults: object = ()) -> None:
    """TypeError for arguments of the wrong shape: a string where a list was
    meant would be taken a character at a time ("localhost" as the domains
    "l", "o", ...), and users that are no dict fail deep inside."""
    if users is not None and not isinstance(users, dict):
        raise TypeError(f"users= maps names to passwords, not a {type(users).__name__}: users={{'alice': 'secret'}}")
    for name, value in (("domains", domains), ("faults", faults)):
        if isinstance(value, str):
            raise TypeError(f"{name}= is a list, not a string: {name}=[{value!r}]")


class MailServer:
    """SMTP and POP3 for one test: a context manager (or start()/stop())."""

    def __init__(self, users: dict[str, str] | None = None, *, domains: tuple[str, ...] = ("localhost",),
                 faults: tuple[str, ...] | list[str] = (), trace: bool = False) -> None:
        check_arguments(users=users, domains=domains, faults=faults)
        self._users = dict(users or {})
        self._domains = tuple(domains)
        self._faults = tuple(faults)
        self._trace = trace
        self._directory: tempfile.TemporaryDirectory | None = None
        self._server: _Server | None = None
        self._parser = BytesParser(policy=email.policy.default)

    # --- life cycle ---------------------------------------------------------------

    def start(self) -> "MailServer":
        if self._server is not None:  # a second server would orphan the first, still running
            raise RuntimeError("this MailServer is already running: stop() it first")
        try:
            self._directory = tempfile.TemporaryDirectory(prefix="pymailsrv-test-")
            settings = load_settings(read_files=False, overrides={
                "root": self._directory.name, "host": "127.0.0.1", "domains": list(self._domains),
                "trace": self._trace, "faults": list(self._faults),
                # A test wants answers now: no delay after a wrong password.
                "pop3": {"port": 0, "failed_login_delay": 0}, "smtp": {"port": 0},
                # Mail relayed by the code under test never leaves the machine:
                # it waits in the queue (queued()), its next hop a closed port.
                "relay": {"smarthost": CLOSED_LOOPBACK_PORT},
            })
            # The accounts before the server, which looks for them as it starts.
            for name, password in self._users.items():
                add_account(UserStore(settings.state_dir), MaildirStore(settings.root), name, password)
            self._server = _Server(settings).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None

    def __enter__(self) -> "MailServer":
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    # --- where it listens -----------------------------------------------------------

    @property
    def _running(self) -> _Server:
        if self._server is None:
            raise RuntimeError("the mail server is not running (use it inside 'with MailServer() as server')")
        return self._server

    @property
    def host(self) -> str:
        return self._running.addresses["smtp"][0]

    @property
    def smtp_port(self) -> int:
        return self._running.addresses["smtp"][1]

    @property
    def pop3_port(self) -> int:
        return self._running.addresses["pop3"][1]

    @property
    def root(self) -> Path:
        return self._running.settings.root

    # --- users and mail ----------------------------------------------------------------

    def add_user(self, name: str, password: str) -> str:
        """Create an account and its Maildir; returns its address in the first domain."""
        context = self._running.context
        user = check_user_name(name)
        add_account(context.users, context.store, user, password)
        return f"{user}@{self._domains[0]}"

    def add_fault(self, spec: str) -> None:
        """Add a fault script while the server runs (``faults.py`` grammar)."""
        self._running.context.faults.add(spec)

    def deliver(self, user: str, message: bytes | str | EmailMessage) -> str:
        """Put a message straight into ``user``'s Maildir; returns its queue id.

        As 'pymailsrv deliver' does, it refuses a user who does not exist: a
        test that delivers to a typo should fail here, not pass emptily.
        """
        user = self._existing(user)
        if isinstance(message, EmailMessage):
            message = message.as_bytes(policy=email.policy.SMTP)
        elif isinstance(message, str):
            message = message.encode("utf-8")
        return self._running.context.store.deliver(user, message)

    def _existing(self, user: str) -> str:
        """``user`` as user names are kept, if such a user exists; else ValueError."""
        name = check_user_name(user)
        if not self._running.context.users.exists(name):
            raise ValueError(f"no such user {user!r}")
        return name

    def messages(self, user: str) -> list[EmailMessage]:
        """Every message in ``user``'s mailbox, oldest first, parsed; a user
        who does not exist is refused, as by deliver()."""
        parsed = []
        for _, path in self._running.context.store.messages(self._existing(user)):
            try:
                with open(path, "rb") as file:
                    parsed.append(self._parser.parse(file))
            except FileNotFoundError:
                continue  # a POP3 client deleted it meanwhile
        return parsed

    def queued(self) -> list[tuple[str, list[str]]]:
        """Mail waiting to be relayed elsewhere: (sender, recipients) per message."""
        return [(entry.sender, [recipient.address for recipient in entry.recipients])
                for entry in self._running.context.queue.entries()]

    def wait_for_messages(self, user: str, count: int, timeout: float = 5.0) -> list[EmailMessage]:
        """Wait until ``user`` has at least ``count`` messages; AssertionError after ``timeout``."""
        try:
            check_seconds(timeout)  # nan too: it would wait for ever
        except ValueError as error:
            raise ValueError(f"timeout {error}, got {timeout!r}") from None
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(user)
            if len(found) >= count or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        if len(found) < count:
            raise AssertionError(f"{user} has {len(found)} messages after {timeout} s, expected {count}")
        return found
