"""A first end-to-end check: deliver, then read and delete over POP3."""

from tests.conftest import PASSWORD


def test_delivered_message_is_retrieved_and_deleted_over_pop3(add_user, store, pop3):
    add_user("alice")
    store.deliver("alice", b"Subject: hi\n\nhello\n")
    client = pop3()
    client.user("alice")
    assert client.pass_(PASSWORD) == b"+OK alice's maildrop has 1 message (22 octets)"
    assert client.retr(1) == (b"+OK 22 octets", [b"Subject: hi", b"", b"hello"], 22)
    assert client.dele(1) == b"+OK message 1 deleted"
    assert client.quit() == b"+OK pymailsrv POP3 server signing off (maildrop empty)"
    assert store.messages("alice") == []
