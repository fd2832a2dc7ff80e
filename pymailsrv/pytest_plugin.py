"""The ``mail_server`` fixture for pytest, registered through the pytest11 entry point.

``pip install pymailsrv`` is enough to have it in any test suite::

    import smtplib
    import pytest

    @pytest.mark.mail_server(users={"alice": "secret"}, faults=["smtp:RCPT#2=452 4.2.2 mailbox full"])
    def test_a_full_mailbox_refuses_the_second_recipient(mail_server):
        with smtplib.SMTP(mail_server.host, mail_server.smtp_port) as client:
            refused = client.sendmail("me@example.org", ["alice@localhost", "alice@localhost"], b"hi")
        assert refused == {"alice@localhost": (452, b"4.2.2 mailbox full")}

The marker takes ``users``, ``faults`` and ``domains``; as pytest's markers
do, the closest one (the test's own, else its class's, else its module's)
is taken whole. ``--mail-fault SPEC`` (repeatable) adds faults to every
mail_server of the run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pymailsrv.faults import Fault, FaultError
from pymailsrv.testing import MailServer, check_arguments

MARKER_OPTIONS = ("users", "faults", "domains")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--mail-fault", action="append", default=[], metavar="SPEC",
                     help="a pymailsrv fault script for every mail_server fixture (repeatable)")


def pytest_configure(config: pytest.Config) -> None:
    options = ", ".join(f"{name}=None" for name in MARKER_OPTIONS)
    config.addinivalue_line("markers", f"mail_server({options}): configure the pymailsrv mail_server fixture")
    for spec in config.getoption("--mail-fault"):
        try:  # once, here: else every test that uses the fixture fails with the same traceback
            Fault.parse(spec)
        except FaultError as error:
            raise pytest.UsageError(f"--mail-fault: {error}") from None


@pytest.fixture
def mail_server(request: pytest.FixtureRequest) -> Iterator[MailServer]:
    """A running pymailsrv (SMTP and POP3 on 127.0.0.1), stopped after the test."""
    marker = request.node.get_closest_marker("mail_server")
    options = _marker_options(marker) if marker else {}
    faults = [*request.config.getoption("--mail-fault"), *(options.get("faults") or ())]
    with MailServer(users=options.get("users"), domains=tuple(options.get("domains") or ("localhost",)),
                    faults=faults) as server:
        yield server


def _marker_options(marker: pytest.Mark) -> dict:
    """The marker's keywords, or a usage error that names the mistake: a
    typo in a keyword would otherwise start a server without what it meant."""
    takes = ", ".join(f"{name}=" for name in MARKER_OPTIONS)
    if marker.args:
        raise pytest.UsageError(f"mail_server takes keywords only ({takes}), not {marker.args!r}")
    unknown = sorted(set(marker.kwargs) - set(MARKER_OPTIONS))
    if unknown:
        raise pytest.UsageError(f"mail_server does not take {', '.join(unknown)} (it takes {takes})")
    try:
        check_arguments(**marker.kwargs)
    except TypeError as error:
        raise pytest.UsageError(f"mail_server's {error}") from None
    return dict(marker.kwargs)
