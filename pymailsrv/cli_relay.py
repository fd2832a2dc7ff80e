"""``pymailsrv alias ...`` and ``pymailsrv queue ...``: the outbound side's commands.

Both groups are built by functions that take ``cli.with_settings`` as an
argument, so this module need not import ``cli`` (which imports it: a
cycle). Each works on the files directly and is safe beside a running
server: the server re-reads the aliases file when it changes, and notices
a flushed or deleted queue entry at its next look into the queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import click

from pymailsrv.aliases import AliasError, AliasTable
from pymailsrv.cli_common import as_data_root_owner, echo_table, require_data_root
from pymailsrv.config import Settings
from pymailsrv.outqueue import OutboundQueue, QueueEntry, State, format_duration, is_queue_id
from pymailsrv.replies import counted, elided
from pymailsrv.users import UserStore

# A queue listing is one line per message; longer errors are cut to this.
LAST_ERROR_COLUMN_WIDTH = 60


def _aliases(settings: Settings) -> AliasTable:
    # A data root that is not there is a mistyped --root: not one to make
    # for an aliases file ('user add' makes one).
    require_data_root(settings.root)
    return AliasTable(settings.state_dir, UserStore(settings.state_dir).names, settings.domains,
                      settings.smtp.postmaster_user)


def alias_group(with_settings: Callable) -> click.Group:
    @click.group("alias")
    def alias() -> None:
        """Aliases: local names for users and outside addresses (ROOT/.pymailsrv/aliases)."""

    @alias.command("add")
    @click.argument("name")
    @click.argument("targets", nargs=-1, required=True)
    @with_settings
    def alias_add(settings: Settings, name: str, targets: tuple[str, ...]) -> None:
        """Make NAME deliver to TARGETs too (users, aliases or user@domain)."""
        table = _aliases(settings)
        as_data_root_owner(settings.root)
        try:
            all_targets = table.add(name, targets)
        except AliasError as error:
            raise click.ClickException(str(error)) from None
        click.echo(f"{name.lower()}: {', '.join(all_targets)}")
        # Added all the same: aliases may be defined in any order, and the
        # user may be created next. Until then expansion skips the name.
        for unknown in table.unknown_names(targets):
            click.echo(f"warning: {unknown!r} is not a local user or alias; nothing is delivered to it "
                       "until it is one", err=True)

    @alias.command("remove")
    @click.argument("name")
    @click.argument("targets", nargs=-1)
    @with_settings
    def alias_remove(settings: Settings, name: str, targets: tuple[str, ...]) -> None:
        """Remove the alias NAME, or only the TARGETs given."""
        table = _aliases(settings)
        as_data_root_owner(settings.root)
        try:
            left = table.remove(name, targets)
        except AliasError as error:
            raise click.ClickException(str(error)) from None
        click.echo(f"{name.lower()}: {', '.join(left)}" if left else f"removed alias {name.lower()}")

    @alias.command("list")
    @with_settings
    def alias_list(settings: Settings) -> None:
        """List every alias, its targets and where its mail ends up."""
        table = _aliases(settings)
        in_file = table.defined_in_file()
        rows = []
        for name, targets in sorted(table.table().items()):
            expansion = table.expand(name)
            where = [*expansion.users, *expansion.external] or ["(nowhere)"]
            rows.append((name + ("" if name in in_file else " (default)"), ", ".join(targets), ", ".join(where)))
        echo_table(rows, ["alias", "targets", "delivers to"])

    return alias


def _row(entry: QueueEntry, now: float) -> tuple:
    pending = entry.pending
    # What the message waits on: a pending recipient's error, else (failures
    # still to be bounced) a failed one's.
    errors = ([recipient.last_error for recipient in pending if recipient.last_error]
              or [recipient.last_error for recipient in entry.recipients
                  if recipient.last_error and recipient.state is State.FAILED])
    last_error = errors[-1] if errors else ""
    recipients = ", ".join(recipient.address + ("" if recipient.state is State.PENDING else f" ({recipient.state})")
                           for recipient in entry.recipients)
    next_try = "-" if not pending else ("now" if entry.next_attempt <= now
                                        else "in " + format_duration(entry.next_attempt - now))
    return (entry.queue_id, format_duration(now - entry.created), f"<{entry.sender}>", recipients, entry.attempts,
            next_try, elided(last_error, LAST_ERROR_COLUMN_WIDTH))


def queue_group(with_settings: Callable) -> click.Group:
    @click.group("queue")
    def queue() -> None:
        """The outbound queue (ROOT/.pymailsrv/queue): mail waiting for other hosts."""

    @queue.command("list")
    @with_settings
    def queue_list(settings: Settings) -> None:
        """List queued messages, oldest first."""
        require_data_root(settings.root)
        now = time.time()
        entries = sorted(OutboundQueue(settings.state_dir).entries(), key=lambda entry: entry.created)
        if not entries:
            click.echo("the queue is empty")
            return
        echo_table([_row(entry, now) for entry in entries],
                   ["id", "age", "sender", "recipients", "attempts", "next try", "last error"])

    @queue.command("flush")
    @with_settings
    def queue_flush(settings: Settings) -> None:
        """Make every queued message due now (a running server tries them at once)."""
        require_data_root(settings.root)
        as_data_root_owner(settings.root)
        count = OutboundQueue(settings.state_dir).flush()
        click.echo(f"{counted(count, 'message')} due now")

    @queue.command("delete")
    @click.argument("queue_id")
    @with_settings
    def queue_delete(settings: Settings, queue_id: str) -> None:
        """Remove message QUEUE_ID from the queue, unsent and unbounced."""
        # The id becomes a file name: "../x" must be refused, not looked up.
        if not is_queue_id(queue_id.upper()):
            raise click.ClickException(f"{queue_id!r} is not a queue id (16 hex digits, as `queue list` shows)")
        queue_id = queue_id.upper()  # as `queue list` shows it
        require_data_root(settings.root)  # else a mistyped --root is "no message"
        as_data_root_owner(settings.root)
        try:
            deleted = OutboundQueue(settings.state_dir).delete(queue_id)
        except OSError as error:  # e.g. a directory where the envelope should be
            raise click.ClickException(f"cannot delete {queue_id}: {error.strerror or error}") from None
        if not deleted:
            raise click.ClickException(f"no message {queue_id} in the queue")
        click.echo(f"deleted {queue_id}")

    return queue
