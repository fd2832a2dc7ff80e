"""``pymailsrv explain``: state diagrams drawn from the live command tables."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from pymailsrv.cli import main
from pymailsrv.commands import Command, CommandTable
from pymailsrv.explain import (
    FORMATS,
    PROTOCOLS,
    render_dot,
    render_mermaid,
    render_text,
    state_machine,
)
from pymailsrv.pop3 import Pop3Session, Pop3State
from pymailsrv.replies import POP3_NOOP
from pymailsrv.smtp import SmtpSession

POP3_TEXT = """\
POP3 state machine, from the command table of Pop3Session
A command moves the state only when it succeeds; one that fails leaves it as it was.

connect -> AUTHORIZATION

  command                on success              defined in           syntax

AUTHORIZATION
  STLS                   (stays)                 RFC 2595 §4          STLS
  USER                   (stays)                 RFC 1939 §7          USER name
  PASS                   -> TRANSACTION          RFC 1939 §7          PASS string
  APOP                   -> TRANSACTION          RFC 1939 §7          APOP name digest
  AUTH                   -> TRANSACTION          RFC 5034 §4          AUTH [mechanism [initial-response]]
  QUIT                   -> (connection closed)  RFC 1939 §4, §6      QUIT
  CAPA                   (stays)                 RFC 2449 §5          CAPA

TRANSACTION
  QUIT                   -> UPDATE               RFC 1939 §4, §6      QUIT
  STAT                   (stays)                 RFC 1939 §5          STAT
  LIST                   (stays)                 RFC 1939 §5          LIST [msg]
  RETR                   (stays)                 RFC 1939 §5          RETR msg
  DELE                   (stays)                 RFC 1939 §5          DELE msg
  NOOP                   (stays)                 RFC 1939 §5          NOOP
  RSET                   (stays)                 RFC 1939 §5          RSET
  TOP                    (stays)                 RFC 1939 §7          TOP msg n
  UIDL                   (stays)                 RFC 1939 §7          UIDL [msg]
  LAST                   (stays)                 RFC 1460 (obsolete)  LAST
  CAPA                   (stays)                 RFC 2449 §5          CAPA
  cut off: none deleted  -> (connection closed)                       (not a command)

UPDATE
  (accepts no commands)
  +OK/-ERR, close        -> (connection closed)                       (not a command)
"""


def explain(*args: str) -> str:
    result = CliRunner().invoke(main, ["explain", *args])
    assert result.exit_code == 0, result.output
    return result.output


class Pop3WithAuth(Pop3Session):
    """POP3 plus one made-up command, as a table change in a later issue would add it."""

    def do_xauth(self, argument: str):
        return POP3_NOOP

    commands = CommandTable(
        *Pop3Session.commands,
        Command("XAUTH", do_xauth, frozenset({Pop3State.AUTHORIZATION}), "XAUTH token", "RFC 9999 §1",
                moves={Pop3State.AUTHORIZATION: Pop3State.TRANSACTION}),
    )


# --- a simple reader for the dot we write -------------------------------------------


def parse_dot(text: str) -> tuple[set[str], list[tuple[str, str, str | None]]]:
    """(node names, [(from, to, label)]) of a digraph, checking its braces balance."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
    depth = 0
    for character in re.sub(r'"(\\.|[^"\\])*"', '""', body):  # braces inside strings do not count
        depth += {"{": 1, "}": -1}.get(character, 0)
        assert depth >= 0, "a } closes nothing"
    assert depth == 0, "unbalanced braces"
    assert re.match(r"\s*digraph \w+ \{", body)
    nodes, edges = set(), []
    for statement in body.splitlines():
        edge = re.fullmatch(r'\s*(\w+) -> (\w+)(?: \[(.*)\])?;', statement)
        node = re.fullmatch(r'\s*(\w+) \[(.*)\];', statement)
        if edge:
            label = re.search(r'label="((?:\\.|[^"\\])*)"', edge[3] or "")
            edges.append((edge[1], edge[2], label[1] if label else None))
        elif node and node[1] not in ("node", "edge"):
            nodes.add(node[1])
    return nodes, edges


# --- text -------------------------------------------------------------------------------


def test_pop3_text_lists_every_state_its_commands_their_moves_and_rfc_sections():
    assert explain("pop3") == POP3_TEXT


def test_smtp_text_shows_each_state_and_the_end_of_data():
    text = explain("smtp", "--format", "text")
    for state in ("CONNECTED", "GREETED", "MAIL", "RCPT", "DATA"):
        assert f"\n{state}\n" in text
    assert re.search(r"\n  MAIL +-> MAIL +RFC 5321 §4\.1\.1\.2 +MAIL FROM:<reverse-path>", text)
    assert re.search(r"\n  <CRLF>\.<CRLF> +-> GREETED +\(not a command\)\n", text)


# --- dot ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_dot_names_every_state_and_labels_every_edge_with_a_verb(protocol):
    session_class = PROTOCOLS[protocol]
    nodes, edges = parse_dot(explain(protocol, "--format", "dot"))
    states = {state.name for state in state_machine(session_class).states}
    assert states <= nodes
    verbs = {command.verb for command in session_class.commands}
    others = {event for _, event, _ in session_class.OTHER_TRANSITIONS}
    labels = [label for _, _, label in edges]
    assert ("connect", state_machine(session_class).start.name, None) in edges
    assert all(label in verbs | others for label in labels if label is not None)
    assert sorted(label for label in labels if label in verbs) == sorted(
        verb for _, verb, _ in session_class.commands.transitions())
    assert {source for source, _, _ in edges} | {target for _, target, _ in edges} <= nodes


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_dot_renders_with_graphviz(protocol):
    rendered = subprocess.run(["dot", "-Tsvg"], input=explain(protocol, "--format", "dot"),
                              capture_output=True, text=True, timeout=20)
    assert rendered.returncode == 0, rendered.stderr
    assert "<svg" in rendered.stdout


# --- mermaid ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_mermaid_is_a_state_diagram_with_start_and_end(protocol):
    session_class = PROTOCOLS[protocol]
    lines = explain(protocol, "--format", "mermaid").splitlines()
    assert lines[0] == "stateDiagram-v2"
    start = state_machine(session_class).start.name
    assert f"    [*] --> {start} : connect" in lines
    assert any(re.fullmatch(r"    \w+ --> \[\*\] : QUIT", line) for line in lines)
    for line in lines[1:]:
        assert re.fullmatch(r"    (%%.*|\[\*\] --> \w+ : .+|\w+ --> (\w+|\[\*\]) : .+|\w+ : .+)", line), line


def test_mermaid_escapes_angle_brackets_so_the_end_of_data_stays_visible():
    assert "    DATA --> GREETED : #lt;CRLF#gt;.#lt;CRLF#gt;" in explain("smtp", "--format", "mermaid")


# --- the diagram follows the table ---------------------------------------------------


def test_first_enum_member_is_where_a_session_starts():
    # explain takes the start from the enum's order; the sessions agree.
    for session_class in PROTOCOLS.values():
        assert state_machine(session_class).start is session_class.initial_state(None)


@pytest.mark.parametrize("render", FORMATS.values(), ids=FORMATS.keys())
def test_adding_a_command_to_the_table_changes_the_diagram(render):
    before, after = render(Pop3Session), render(Pop3WithAuth)
    assert "XAUTH" not in before
    assert "XAUTH" in after
    assert "RFC 9999 §1" in after


def test_a_new_command_with_a_move_becomes_an_edge():
    _, edges = parse_dot(render_dot(Pop3WithAuth))
    assert ("AUTHORIZATION", "TRANSACTION", "XAUTH") in edges
    assert "    AUTHORIZATION --> TRANSACTION : XAUTH" in render_mermaid(Pop3WithAuth)
    assert re.search(r"\n  XAUTH +-> TRANSACTION +RFC 9999 §1 +XAUTH token\n", render_text(Pop3WithAuth))


def test_unknown_protocol_is_a_usage_error():
    result = CliRunner().invoke(main, ["explain", "imap"])
    assert result.exit_code == 2
