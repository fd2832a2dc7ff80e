"""Aliases: local names that stand for other local users and outside addresses.

The table is a plain text file, ``ROOT/.pymailsrv/aliases``, in the
spirit of sendmail's ``/etc/aliases`` (aliases(5)), so a person can edit it
as well as ``pymailsrv alias add/remove``::

    # name: target, target ...
    staff: alice, bob
    sales: carol, orders@shop.example.net
    carol: carol, carol@home.example.org     # keep a copy, and forward one
    list: staff,
      sales                                  # a line that starts with a space continues the one before

A target is a local name (a user or another alias) or an address
``local@domain``; an address in one of our own domains counts as its local
part. Names follow the rules of user names (``users.check_user_name``).

Expansion (``AliasTable.expand``) follows the targets recursively, as
RFC 5321 §3.9.1 describes aliases: the envelope recipient is replaced by
the targets, and the original envelope sender is kept (the bounce address
stays the sender's, not ours). Two rules keep it finite and unsurprising:

* a name that is already being expanded further up is not expanded again.
  If it is a user, that user gets the mail (``carol: carol, carol@home``
  keeps a copy, as in sendmail); if not, it is a loop, logged and skipped;
* every target is delivered to once, however many paths lead to it.

``postmaster`` (RFC 5321 §4.5.1 requires it) and ``abuse`` (RFC 2142 §4)
exist even when the file does not name them: they point to
``smtp.postmaster``, else to the first user. A line in the file, or a user
of that name, overrides that.

The server re-reads the file when it changes on disk (``durable.ChangedFile``),
so an edit applies without a restart. The CLI's changes are read-modify-
write under an ``flock`` with an atomic rewrite; they keep the comments, the
order and the layout of every line they do not change. A line that cannot
be parsed is logged and skipped, never fatal: one typo must not stop mail.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pymailsrv.durable import ChangedFile, exclusive_lock, write_atomically
from pymailsrv.limits import ALIAS_DEPTH_MAX
from pymailsrv.paths import PathError, in_domains, least_quoted, parse_path, unquoted_local_part
from pymailsrv.users import UserError, check_user_name

log = logging.getLogger("pymailsrv.aliases")

ALIASES_FILE_NAME = "aliases"
# RFC 5321 §4.5.1 (postmaster) and RFC 2142 §4 (abuse): names every mail
# domain should answer, so they exist unless the file says otherwise.
DEFAULT_ALIASES = ("postmaster", "abuse")

_NAME_LINE = re.compile(r"\s*([^\s:#][^:]*?)\s*:(.*)")
# A comment starts at a "#" that begins the line or follows white space; a
# "#" inside an address (it is legal in a local part) is not one.
_COMMENT = re.compile(r"(?:^|(?<=\s))#")


class AliasError(Exception):
    """An alias change that cannot be made; the message says why."""


@dataclass(frozen=True)
class Expansion:
    """Where mail for one local name goes."""

    users: tuple[str, ...] = ()  # local users, for Maildir delivery
    external: tuple[str, ...] = ()  # addresses elsewhere, for the outbound queue
    # Problems met on the way (already logged): loops, unknown names.
    problems: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        """True if the mail goes anywhere at all."""
        return bool(self.users or self.external)


@dataclass
class _Entry:
    """One alias as the file has it: the lines it spans and its targets."""

    name: str
    targets: list[str]
    # Indexes into the file's lines: every line that defines it, first one
    # first (a name defined twice has two runs of lines).
    lines: list[int]


@dataclass
class _AliasFile:
    lines: list[str] = field(default_factory=list)
    entries: dict[str, _Entry] = field(default_factory=dict)


def check_target(target: str, local_domains: Iterable[str] = ()) -> str:
    """A target as we keep it: a checked local name, or a checked address.

    An address in one of ``local_domains`` becomes its local part.
    """
    try:
        target.encode("utf-8")
    except UnicodeEncodeError:
        # Bytes that are not UTF-8 on a command line arrive as lone
        # surrogates (PEP 383): no file or mail server could take them.
        raise AliasError(f"invalid target {target!r}: not valid UTF-8") from None
    target = target.strip()
    if "," in target or _COMMENT.search(target):
        # The aliases file separates targets with "," and starts a comment
        # at a "#" after a space: a quoted local part holding either could
        # not be read back.
        raise AliasError(f"invalid target {target!r}: an aliases file cannot hold ',' or ' #' in an address")
    if "@" not in target:
        return _checked_name(target)
    try:
        address, rest = parse_path(f"<{target}>", reverse_path=False)
    except PathError as error:
        raise AliasError(f"invalid target {target!r}: {error}") from None
    if rest.strip() or not address.domain:
        raise AliasError(f"invalid target {target!r}")
    if in_domains(address.domain, local_domains):
        return _checked_name(unquoted_local_part(address.local_part))
    # One form for one mailbox: "x"@example.com and x@example.com, both
    # targets, were sent two copies.
    return least_quoted(address)


def _checked_name(name: str) -> str:
    try:
        return check_user_name(name)
    except UserError as error:
        raise AliasError(str(error).replace("user name", "name")) from None


def _lines(text: str) -> list[str]:
    """The lines of a file that ends them with LF (or CRLF). Not
    ``str.splitlines``: it also ends a line at U+2028 and other separators
    that an address in quotes may hold, and the address would read back as
    two lines, the second a new alias."""
    return [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")] if text else []


def _parse(text: str, where: str = "aliases") -> _AliasFile:
    """Lines and entries of an aliases file; bad lines are logged and skipped."""
    # An editor's byte-order mark is no part of the first name. (Not the
    # utf-8-sig codec: loaded on first use, after --run-as it may be unreadable.)
    parsed = _AliasFile(lines=_lines(text.removeprefix("\ufeff")))
    current: _Entry | None = None
    for number, line in enumerate(parsed.lines):
        content = _COMMENT.split(line, 1)[0]
        if not content.strip():
            continue
        if line[0] in " \t":  # a continuation (aliases(5)), never a name of its own
            if current is None:  # of a line skipped, or of none: skipped with it
                log.warning("%s line %d skipped: it continues a line that was skipped, or none", where, number + 1)
                continue
            current.targets.extend(part.strip() for part in content.split(",") if part.strip())
            current.lines.append(number)
            continue
        match = _NAME_LINE.fullmatch(content)
        try:
            if match is None:
                raise AliasError("expected 'name: target, target'")
            name = _checked_name(match.group(1))
        except AliasError as error:
            log.warning("%s line %d skipped: %s", where, number + 1, error)
            current = None
            continue
        targets = [part.strip() for part in match.group(2).split(",") if part.strip()]
        if name in parsed.entries:
            # newaliases warns and keeps both lists; we do the same.
            log.warning("%s line %d: %r is defined again; its targets are added", where, number + 1, name)
            current = parsed.entries[name]
            current.targets.extend(targets)
            current.lines.append(number)
        else:
            current = parsed.entries[name] = _Entry(name, targets, [number])
    return parsed


def _read(path: Path) -> _AliasFile:
    # surrogateescape, as _editing reads it: a target that is not UTF-8 is
    # then refused by check_target, not turned into another address.
    return _parse(path.read_text(encoding="utf-8", errors="surrogateescape"), str(path))


class AliasTable:
    """The aliases of one data root, re-read when the file changes.

    ``user_names`` says which local users exist now (``UserStore.names``);
    ``postmaster`` is the user that the default aliases point to, None for
    the first user.
    """

    def __init__(self, state_dir: Path, user_names: Callable[[], list[str]],
                 domains: Iterable[str] = ("localhost",), postmaster: str | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / ALIASES_FILE_NAME
        self._lock_path = self.state_dir / "aliases.lock"
        self._user_names = user_names
        self.domains = tuple(domains)
        self._postmaster = postmaster
        self._file = ChangedFile(self.path, _read, missing=_AliasFile())

    # --- reading ---------------------------------------------------------------

    def table(self) -> dict[str, list[str]]:
        """Every alias and its targets as written, the defaults included."""
        return self._table(self._user_names())

    def _table(self, user_names: list[str]) -> dict[str, list[str]]:
        aliases = {name: list(entry.targets) for name, entry in self._file.get().entries.items()}
        for name, targets in self._defaults(user_names).items():
            aliases.setdefault(name, targets)
        return aliases

    def _defaults(self, user_names: list[str]) -> dict[str, list[str]]:
        """The default aliases (postmaster, abuse) that no user's name takes."""
        postmaster = self._postmaster or next(iter(user_names), None)
        if postmaster is None:
            return {}
        return {name: [postmaster] for name in DEFAULT_ALIASES if name not in user_names}

    def defined_in_file(self) -> set[str]:
        return set(self._file.get().entries)

    def expand(self, local_part: str) -> Expansion:
        """Where mail for ``local_part`` goes: users and outside addresses.

        A name that is neither an alias nor a user expands to nothing
        (``bool(expansion)`` is False): RCPT answers 550 for it.
        """
        user_names = self._user_names()  # one look at the users file per expansion (per RCPT)
        # Looked up, not copied: a copy of the whole table per RCPT cost in
        # proportion to the file (0.3 s a lookup with 200,000 aliases).
        entries, defaults = self._file.get().entries, self._defaults(user_names)

        def targets_of(alias: str) -> list[str] | None:
            entry = entries.get(alias)
            return entry.targets if entry is not None else defaults.get(alias)

        users = set(user_names)
        found_users: list[str] = []
        external: list[str] = []
        problems: list[str] = []
        # The aliases expanded so far. Breadth first, each is met first by
        # its shortest path, so once is enough, however many paths lead to
        # it: the depth limit cuts only what no shorter path reaches.
        done: set[str] = set()
        try:
            name = _checked_name(local_part)
        except AliasError:
            return Expansion()
        waiting: deque[tuple[str, tuple[str, ...]]] = deque([(name, ())])  # a target, the aliases above it
        while waiting:
            target, path = waiting.popleft()
            try:
                target = check_target(target, self.domains)
            except AliasError as error:
                problems.append(f"{' -> '.join(path)}: {error}")
                continue
            if "@" in target:
                if target not in external:
                    external.append(target)
                continue
            targets = targets_of(target)
            if target in path or targets is None:
                if target in users:
                    if target not in found_users:
                        found_users.append(target)
                elif target in path:
                    problems.append(f"alias loop: {' -> '.join(path + (target,))}")
                elif path:  # a bad target; an unknown recipient itself is only a 550
                    problems.append(f"{' -> '.join(path + (target,))}: no such user or alias")
                continue
            if target in done:
                continue  # reached again by another path: its targets are in already
            done.add(target)
            if len(path) >= ALIAS_DEPTH_MAX:
                problems.append(f"more than {ALIAS_DEPTH_MAX} aliases deep: {' -> '.join(path + (target,))}")
                continue
            waiting.extend((next_target, path + (target,)) for next_target in targets)
        for problem in problems:
            log.warning("expanding %r: %s", name, problem)
        return Expansion(tuple(found_users), tuple(external), tuple(problems))

    def unknown_names(self, targets: Iterable[str]) -> list[str]:
        """The local names among ``targets`` that are neither a user nor an alias (yet)."""
        user_names = self._user_names()
        known = set(user_names) | set(self._table(user_names))
        local = [check_target(target, self.domains) for target in targets]
        return [name for name in local if "@" not in name and name not in known]

    # --- changing ----------------------------------------------------------------

    def add(self, name: str, targets: Iterable[str]) -> list[str]:
        """Add targets to ``name`` (created if need be); returns its targets now."""
        name = _checked_name(name)
        checked = list(dict.fromkeys(check_target(target, self.domains) for target in targets))  # each once
        if not checked:
            raise AliasError("give at least one target")
        with self._editing() as (parsed, lines):
            entry = parsed.entries.get(name)
            if entry is None:
                lines.append(_format(name, checked))
                return checked
            # As remove() compares them: 'Alice' and '"alice"@localhost' are alice.
            present = {_canonical(target, self.domains) for target in entry.targets}
            targets = entry.targets + [target for target in checked if target not in present]
            _replace_entry(lines, entry, _format(name, targets))
            return targets

    def remove(self, name: str, targets: Iterable[str] = ()) -> list[str]:
        """Remove ``name``, or only some of its targets; returns the targets left."""
        name = _checked_name(name)
        unwanted = {check_target(target, self.domains) for target in targets}
        with self._editing() as (parsed, lines):
            entry = parsed.entries.get(name)
            if entry is None:
                raise AliasError(f"no alias {name!r} in {self.path}")
            left = []
            if unwanted:
                kept = [target for target in entry.targets
                        if _canonical(target, self.domains) not in unwanted]
                missing = unwanted - {_canonical(target, self.domains) for target in entry.targets}
                if missing:
                    raise AliasError(f"{name!r} has no target {', '.join(sorted(missing))}")
                left = kept
            _replace_entry(lines, entry, _format(name, left) if left else None)
            return left

    @contextlib.contextmanager
    def _editing(self) -> Iterator[tuple[_AliasFile, list[str | None]]]:
        """The file parsed and its lines, under the lock; the changed lines are written back."""
        with exclusive_lock(self._lock_path):
            # A hand edit in another encoding is kept byte for byte in the
            # lines we do not change (surrogateescape); the server reads it
            # the same way, and skips its names and targets that are not UTF-8.
            try:
                text = self.path.read_text(encoding="utf-8", errors="surrogateescape")
            except FileNotFoundError:
                text = ""
            parsed = _parse(text, str(self.path))
            lines: list[str | None] = list(parsed.lines)
            yield parsed, lines
            text = "".join(line + "\n" for line in lines if line is not None)
            # Not secret, unlike users.json: anyone may read where mail goes.
            write_atomically(self.path, text.encode("utf-8", "surrogateescape"), mode=0o644)


def _canonical(target: str, domains: Iterable[str]) -> str:
    try:
        return check_target(target, domains)
    except AliasError:
        return target


def _format(name: str, targets: list[str]) -> str:
    return f"{name}: {', '.join(targets)}"


def _replace_entry(lines: list[str | None], entry: _Entry, new_line: str | None) -> None:
    """Put ``new_line`` where the entry was (None: drop it), keeping line numbers valid."""
    for number in entry.lines:
        lines[number] = None
    lines[entry.lines[0]] = new_line
