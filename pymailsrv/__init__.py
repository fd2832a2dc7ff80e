"""pymailsrv: an SMTP and POP3 mail server on Maildir that you can read end to end."""

__version__ = "0.1.0"
