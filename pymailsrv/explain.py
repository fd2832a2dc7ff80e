"""``pymailsrv explain``: a protocol's state machine, drawn from its command table.

Nothing here knows POP3 or SMTP. Everything comes from what a session class
already carries, so the picture cannot drift from the code that runs (the
lesson of h11's ``make-state-diagrams.py``, whose header warns that
hand-coded transitions must be copied into the script by hand):

* the states are the members of the protocol's state enum, in the order the
  enum lists them; the first is where a connection starts (RFC 1939 §3
  starts in AUTHORIZATION, RFC 5321 §3.1 with the 220 greeting);
* the commands a state accepts are ``commands.allowed_in(state)``;
* where a command leads is its ``moves``: a state it moves to when it
  succeeds there, or None when the server closes the connection. A command
  with no move for a state leaves the state as it was; so does any command
  that fails;
* ``OTHER_TRANSITIONS`` adds the changes no command makes (the end of the
  DATA text, the close after UPDATE). The Graphviz drawing dashes them.

Three renderings, all pure functions of the session class, so a test can
hand in a subclass with one more command and see the drawing change:

* ``text``: one block per state, for a terminal;
* ``dot``: a Graphviz digraph (``... --format dot | dot -Tsvg > pop3.svg``);
* ``mermaid``: a ``stateDiagram-v2`` block to paste into Markdown.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import click

from pymailsrv.commands import Command
from pymailsrv.pop3 import Pop3Session
from pymailsrv.session import Session
from pymailsrv.smtp import SmtpSession

SessionClass = type[Session]

# The protocols ``pymailsrv explain`` can draw, by the name each session gives itself.
PROTOCOLS: dict[str, SessionClass] = {cls.protocol: cls for cls in (Pop3Session, SmtpSession)}


@dataclass(frozen=True)
class Row:
    """One line of a state's block: a command (or other event) and where it leads.

    ``command`` is None for a change that no command makes (OTHER_TRANSITIONS);
    ``moves`` is False when the state stays as it was.
    """

    label: str
    target: enum.Enum | None
    moves: bool
    command: Command | None = None


@dataclass(frozen=True)
class StateMachine:
    """What every rendering draws: the states, the start, and each state's rows."""

    protocol: str
    states: tuple[enum.Enum, ...]
    start: enum.Enum
    rows: dict[enum.Enum, list[Row]]  # state -> its rows, commands in table order

    def edges(self) -> list[tuple[enum.Enum, Row]]:
        """(from state, row) for every row that moves: the arrows of a diagram."""
        return [(state, row) for state in self.states for row in self.rows[state] if row.moves]


def state_machine(session_class: SessionClass) -> StateMachine:
    """Read the state machine out of a session class's command table."""
    table = session_class.commands
    others = session_class.OTHER_TRANSITIONS
    # Any state the table or the other transitions mention names the enum.
    mentioned = [state for command in table for state in command.states]
    mentioned += [state for state, _, _ in others]
    if not mentioned:
        raise ValueError(f"{session_class.__name__} has no states in its command table")
    states = tuple(type(mentioned[0]))
    rows: dict[enum.Enum, list[Row]] = {}
    for state in states:
        rows[state] = [
            Row(command.verb, command.moves.get(state, state), state in command.moves, command)
            for command in table.allowed_in(state)
        ]
        rows[state] += [Row(event, target, True) for source, event, target in others if source is state]
    return StateMachine(session_class.protocol, states, states[0], rows)


def _accepted(rows: list[Row]) -> list[str]:
    """The commands of a state's box in a diagram, each with its RFC section."""
    return [f"{row.label} - {row.command.rfc}" for row in rows if row.command]


def _target_name(target: enum.Enum | None) -> str:
    return "(connection closed)" if target is None else target.name


# --- text -----------------------------------------------------------------------


def render_text(session_class: SessionClass) -> str:
    """The state machine for a terminal: one block per state, columns aligned."""
    machine = state_machine(session_class)
    title = f"{machine.protocol.upper()} state machine, from the command table of {session_class.__name__}"
    lines = [
        title,
        "A command moves the state only when it succeeds; one that fails leaves it as it was.",
        "",
        f"connect -> {machine.start.name}",
    ]
    table = {
        state: [
            (row.label,
             f"-> {_target_name(row.target)}" if row.moves else "(stays)",
             row.command.rfc if row.command else "",
             row.command.syntax if row.command else "(not a command)")
            for row in machine.rows[state]
        ]
        for state in machine.states
    }
    heading = ("command", "on success", "defined in", "syntax")
    # One set of column widths for every block, so the eye can run down a column.
    all_rows = [heading, *(row for rows in table.values() for row in rows)]
    widths = [max(len(row[column]) for row in all_rows) for column in range(3)]

    def line(cells: tuple[str, str, str, str]) -> str:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths)]
        return ("  " + "  ".join(padded) + "  " + cells[3]).rstrip()

    lines += ["", line(heading)]
    for state in machine.states:
        lines += ["", state.name]
        if not any(row.command for row in machine.rows[state]):
            lines.append("  (accepts no commands)")
        lines += [line(cells) for cells in table[state]]
    return "\n".join(lines) + "\n"


# --- Graphviz dot -------------------------------------------------------------------

_DOT_START = "connect"
_DOT_END = "closed"


def _dot_escape(text: str) -> str:
    """Text for inside a double-quoted dot string: backslash and quote escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _dot_string(text: str) -> str:
    return f'"{_dot_escape(text)}"'


def _dot_node(state: enum.Enum | None) -> str:
    return _DOT_END if state is None else state.name


def render_dot(session_class: SessionClass) -> str:
    """A Graphviz digraph: states as boxes listing what they accept, moves as arrows."""
    machine = state_machine(session_class)
    name = machine.protocol
    lines = [
        f"// {name.upper()} state machine, drawn from {session_class.__name__}'s command table",
        f"// by `pymailsrv explain {name} --format dot`. Render: dot -Tsvg -o {name}.svg",
        "// Each box lists the commands its state accepts; an arrow is a command that moves",
        "// the state when it succeeds. Dashed arrows are changes no command makes.",
        f"digraph {name} {{",
        "    rankdir=LR;",
        '    node [shape=box, style=rounded, fontname="Helvetica"];',
        '    edge [fontname="Helvetica", fontsize=10];',
        f'    {_DOT_START} [shape=plaintext, label="connect"];',
        f'    {_DOT_END} [shape=plaintext, label="connection closed"];',
    ]
    for state in machine.states:
        accepted = _accepted(machine.rows[state]) or ["(accepts no commands)"]
        # In a dot label "\\n" ends a centred line and "\\l" a left-justified one.
        label = "\\n\\n".join([_dot_escape(state.name), "\\l".join(map(_dot_escape, accepted)) + "\\l"])
        lines.append(f'    {state.name} [label="{label}"];')
    lines.append(f"    {_DOT_START} -> {machine.start.name};")
    for state, row in machine.edges():
        if row.command:
            attributes = (f"label={_dot_string(row.label)}, "
                          f"tooltip={_dot_string(f'{row.command.syntax} ({row.command.rfc})')}")
        else:
            attributes = f"label={_dot_string(row.label)}, style=dashed"
        lines.append(f"    {state.name} -> {_dot_node(row.target)} [{attributes}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- Mermaid ------------------------------------------------------------------------


def _mermaid_text(text: str) -> str:
    # Mermaid reads "<...>" as HTML and drops it; its entity codes keep the
    # angle brackets of "<CRLF>.<CRLF>" on the page.
    return text.replace("<", "#lt;").replace(">", "#gt;")


def render_mermaid(session_class: SessionClass) -> str:
    """A Mermaid ``stateDiagram-v2`` block: [*] is the connection opening and closing."""
    machine = state_machine(session_class)
    name = machine.protocol
    lines = [
        "stateDiagram-v2",
        f"    %% {name.upper()} state machine, drawn from {session_class.__name__}'s command table",
        f"    %% by `pymailsrv explain {name} --format mermaid`.",
        f"    [*] --> {machine.start.name} : connect",
    ]
    for state in machine.states:
        for description in _accepted(machine.rows[state]) or ["(accepts no commands)"]:
            lines.append(f"    {state.name} : {_mermaid_text(description)}")
    for state, row in machine.edges():
        target = "[*]" if row.target is None else row.target.name
        lines.append(f"    {state.name} --> {target} : {_mermaid_text(row.label)}")
    return "\n".join(lines) + "\n"


FORMATS: dict[str, Callable[[SessionClass], str]] = {
    "text": render_text,
    "dot": render_dot,
    "mermaid": render_mermaid,
}


@click.command()
@click.argument("protocol", type=click.Choice(sorted(PROTOCOLS)))
@click.option("--format", "output_format", type=click.Choice(list(FORMATS)), default="text",
              show_default=True, help="text for a terminal, dot for Graphviz, mermaid for Markdown.")
def explain(protocol: str, output_format: str) -> None:
    """Print a protocol's state machine, drawn from its live command table."""
    click.echo(FORMATS[output_format](PROTOCOLS[protocol]), nl=False)
