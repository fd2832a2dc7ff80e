"""Pieces of the command line that more than one command module uses.

They live here, not in ``cli.py``, because ``cli.py`` imports every command
module: a command module importing ``cli.py`` back would make a cycle.
"""

from __future__ import annotations

import getpass
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import click

from pymailsrv.replies import counted
from pymailsrv.trace import escape_controls, shown
from pymailsrv.users import UserError, valid_new_password


def echo_report(text: str, **options: object) -> None:
    """click.echo for text that holds what clients, servers or senders wrote
    (addresses, replies, headers): its control characters are escaped, so an
    ESC in a mail header cannot recolour or rewrite the terminal reading it."""
    click.echo(escape_controls(text), **options)


def echo_table(rows: list[tuple], headers: list[str]) -> None:
    """A table of what others wrote (subjects, addresses, replies), each cell
    escaped before its width is measured: escaped after, an ESC that
    tabulate counted as nothing pushed the columns out of line."""
    from tabulate import tabulate  # here, not at the top: start and most commands go without it

    click.echo(tabulate([[shown(cell) if isinstance(cell, str) else cell for cell in row] for row in rows],
                        headers=headers))


def note_mail_left(name: str, left: int) -> None:
    """The note for a new account whose Maildir holds mail an earlier account
    of that name left ('user remove' keeps it, add_account counts it)."""
    if left:
        click.echo(f"note: {name}'s Maildir already holds {counted(left, 'message')}, left by an earlier "
                   f"account of that name; {name} will see them", err=True)


def read_password(from_stdin: bool) -> str:
    """The first line of stdin, or a hidden prompt asked twice; never empty."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        try:
            with warnings.catch_warnings():  # getpass's "Can not control echo" when stdin is a pipe
                warnings.simplefilter("ignore", getpass.GetPassWarning)
                password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
        except click.Abort:  # Ctrl-C, or the end of a piped stdin before the second time
            raise click.ClickException("no password given: type it twice at the prompt, or give "
                                       "--password-stdin and the password on stdin") from None
    try:
        return valid_new_password(password)
    except UserError as error:
        raise click.ClickException(str(error)) from None


def as_data_root_owner(root: Path) -> None:
    """For a command that writes into the data root, run as root: become
    its owner, as the server does with --run-as, and as Dovecot's doveadm
    becomes the mail user.

    Else what the command writes there is root's alone: a queue entry that
    'queue flush' rewrote could never again be read by the server, so its
    mail would be neither delivered nor bounced. Commands that only read
    stay as they are.
    """
    if os.geteuid() != 0:
        return
    try:
        root_status = root.stat()
    except OSError:  # not there yet: the command makes it, as root
        return
    if root_status.st_uid != 0:
        os.setgroups([])  # once the uid is not 0, groups can no longer change
        os.setgid(root_status.st_gid)
        os.setuid(root_status.st_uid)


def require_data_root(root: Path) -> None:
    """For a command that only reads: a data root that is not there is a
    mistyped --root (or a server never set up), not an empty one."""
    if not root.is_dir():
        raise click.ClickException(f"no data root at {root} (is --root right? 'user add' makes one)")


def output_file(*names: str, help_text: str, new: bool = False) -> Callable[[Callable], Callable]:
    """An option naming a file to write, checked when the command line is read.

    ``click.Path`` checks the file but not the directory it goes into; this
    checks that too, so a typo is refused before the command does any work
    (creates accounts, grades a class) rather than after. ``new``: a file
    that is already there is refused, where what it holds exists nowhere else.
    """

    def can_be_written(context: click.Context, parameter: click.Parameter, value: str | None) -> str | None:
        if value == "":  # Path("").parent is ".", which is there: the empty name would pass
            raise click.BadParameter("give a file name")
        if value is None:
            return value
        try:
            if not Path(value).parent.is_dir():
                raise click.BadParameter(f"no directory {Path(value).parent} to write into")
            if new and os.path.lexists(value):
                raise click.BadParameter(f"{value} is already there: give a new file name")
        except OSError as error:  # a name too long, say
            raise click.BadParameter(f"cannot use {value}: {error.strerror or error}") from None
        return value

    return click.option(*names, type=click.Path(dir_okay=False, writable=True), metavar="FILE",
                        callback=can_be_written, help=help_text)
