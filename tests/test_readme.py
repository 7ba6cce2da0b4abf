"""README.md as an admin reads it: every command block runs as written, every link resolves.

Every ```sh and ```console block of README.md is either run here or marked, on the line
right before it, with ``<!-- not-runnable: REASON -->``; an unmarked block that is not run
fails.  A block runs as written, in a sandbox that looks like the machine the README talks
about and leaves nothing behind:

- a mount namespace where ``/etc``, ``/srv``, ``/home``, ``/usr/local`` and this checkout are
  overlays on a temporary directory (users ``alice`` and ``bob`` exist there,
  ``/etc/pobox/pobox.toml`` is a throwaway configuration on ``/etc/pobox/passwd`` with
  ``postmaster``, ``pobox`` is on PATH as ``scripts/install`` puts it, in ``/usr/local/bin``);
- a network namespace of its own with only loopback, so ``0.0.0.0:110`` is nobody's port;
- the block's commands run by bash with ``set -e`` from the checkout, password prompts
  answered on standard input; a command that starts a server (``pobox serve``,
  ``./scripts/demo``) is started in the background, probed until its port greets, then
  stopped by its PID with SIGTERM, and must exit 0.

Inline commands count too: every `` `pobox SUBCOMMAND ...` `` the text names must be a
command ``pobox`` has (its ``--help`` exits 0).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pobox.cli import build_parser
from tests.helpers import need

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
POBOX = Path(sys.executable).with_name("pobox")
#: Seconds a block may take (a deadline for the test, not a timed assertion).
BLOCK_DEADLINE = 300

_FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_MARK = re.compile(r"<!-- not-runnable: (\S.*?) -->")
#: Commands that start a server, and the port each serves on (from its arguments).
_SERVER = re.compile(r"^(?:pobox serve|\./scripts/demo)\b")


@dataclass(frozen=True)
class Block:
    """One command block of README.md."""

    line: int
    lang: str
    text: str
    #: Why it is not run, from its marker; ``None``: it must run.
    not_runnable: str | None

    @property
    def id(self) -> str:
        """A test id: the line and the first command."""
        first = self.commands[0] if self.commands else ""
        return f"L{self.line}:{first[:40]}"

    @property
    def commands(self) -> list[str]:
        """The block's commands: ``\\``-continued lines joined; console output dropped."""
        lines = self.text.splitlines()
        if self.lang == "console":
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        out: list[str] = []
        pending = ""
        for line in lines:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append(pending + line)
            pending = ""
        return [cmd for cmd in out if cmd.strip() and not cmd.lstrip().startswith("#")]


def readme_blocks() -> list[Block]:
    """Return every ```sh and ```console block of README.md."""
    text = README.read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        lang = match.group(1)
        if lang not in ("sh", "console"):
            continue
        before = [line for line in text[: match.start()].splitlines() if line.strip()]
        mark = _MARK.fullmatch(before[-1].strip()) if before else None
        blocks.append(
            Block(
                line=text.count("\n", 0, match.start()) + 1,
                lang=lang,
                text=match.group(2),
                not_runnable=mark.group(1) if mark else None,
            )
        )
    return blocks


def _port_of(command: str) -> int:
    """The port a server command listens on: its ``--listen``, else the demo's 1110."""
    match = re.search(r"--listen \S*:(\d+)", command)
    return int(match.group(1)) if match else 1110


_PRELUDE = r"""
set -euo pipefail
S={sandbox}
overlay() {{
  mkdir -p "$S/$2/upper" "$S/$2/work"
  mount -t overlay overlay -o "lowerdir=$1,upperdir=$S/$2/upper,workdir=$S/$2/work" "$1"
}}
overlay /etc etc
overlay /srv srv
overlay /home home
overlay /usr/local usr-local
overlay {root} checkout
ip link set lo up
useradd --system --no-create-home alice
useradd --system --no-create-home bob
mkdir -p /etc/pobox /usr/local/bin
ln -sfn {root}/.venv/bin/pobox /usr/local/bin/pobox
export PATH=/usr/local/bin:$PATH
pobox user add postmaster -f /etc/pobox/passwd --password-stdin <<< secret > /dev/null
cat > /etc/pobox/pobox.toml <<'EOF'
listen = ["127.0.0.1:1110"]
passwd_file = "/etc/pobox/passwd"
mail_location = "maildir:/srv/mail/%u"
EOF
cd {root}
printf 'secret\n' > pw.txt

greets() {{  # does 127.0.0.1:$1 answer with a POP3 greeting?
  {python} - "$1" <<'EOF'
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as s:
        sys.exit(0 if s.recv(64).startswith(b"+OK") else 1)
except OSError:
    sys.exit(1)
EOF
}}

serve() {{  # serve PORT COMMAND: start, probe until it greets, stop by PID
  local port=$1; shift
  bash -c "$*" > "$S/server.log" 2>&1 < /dev/null &
  local pid=$!
  until greets "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "server exited before answering:"; cat "$S/server.log"; exit 1
    fi
    sleep 0.2
  done
  echo "readme-test: $* answered on port $port"
  kill -TERM "$pid"
  wait "$pid" || {{ echo "server exit status $?:"; cat "$S/server.log"; exit 1; }}
}}
"""


def sandbox_script(block: Block, sandbox: Path) -> str:
    """Return the bash script that runs ``block`` in the sandbox."""
    lines = [
        _PRELUDE.format(sandbox=sandbox, root=ROOT, python=sys.executable),
        "# the block, as written:",
    ]
    for command in block.commands:
        if _SERVER.match(command.strip()):
            lines.append(f"serve {_port_of(command)} {shlex.quote(command)}")
        else:
            # A terminal answers each prompt: every command reads 'secret' lines of its own
            # (a redirection of the command itself, ``< pw.txt``, still wins).
            lines.append(f"{{ {command}\n}} < <(yes secret)")
    return "\n".join(lines) + "\n"


def run_in_sandbox(block: Block, sandbox: Path) -> subprocess.CompletedProcess[str]:
    """Run ``block`` in fresh mount and network namespaces."""
    script = sandbox / "block.sh"
    script.write_text(sandbox_script(block, sandbox))
    return subprocess.run(
        [need("unshare"), "--mount", "--net", "--propagation", "private", "bash", str(script)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BLOCK_DEADLINE,
        check=False,
    )


BLOCKS = readme_blocks()


class TestBlocks:
    """The command blocks."""

    def test_blocks_found(self) -> None:
        """The parser finds the README's blocks (an empty list would prove nothing)."""
        assert len(BLOCKS) >= 8
        assert any(block.not_runnable is None for block in BLOCKS)

    @pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
    def test_block_runs_as_written(self, block: Block, tmp_path: Path) -> None:
        """The block's commands all succeed in the sandbox, or it says why it is not run."""
        if block.not_runnable is not None:
            assert len(block.not_runnable) > 10, "say why the block is not run"
            return
        result = run_in_sandbox(block, tmp_path)
        assert 0 == result.returncode, (
            f"README.md line {block.line}:\n{block.text}\n--- stdout\n{result.stdout}"
            f"\n--- stderr\n{result.stderr[-4000:]}"
        )

    def test_unmarked_failing_block_fails(self, tmp_path: Path) -> None:
        """The check can fail: a command that does not exist is an error in the sandbox."""
        block = Block(1, "sh", "pobox no-such-command\n", None)
        assert 0 != run_in_sandbox(block, tmp_path).returncode

    def test_sandbox_is_private(self, tmp_path: Path) -> None:
        """What a block writes to /etc stays in the sandbox."""
        marker = "/etc/pobox-readme-test-marker"
        block = Block(1, "sh", f"touch {marker}\ntest -e {marker}\n", None)
        assert 0 == run_in_sandbox(block, tmp_path).returncode
        assert not Path(marker).exists()


def _inline_commands() -> list[str]:
    """Every inline `` `pobox WORD [WORD]...` `` span of the README's text (not its blocks)."""
    text = _FENCE.sub("", README.read_text())
    spans = re.findall(r"`(pobox [a-z][a-z-]*(?: [^`]*)?)`", text)
    out = set()
    for span in spans:
        words = span.split()[1:3]
        command = ["pobox", words[0]]
        if len(words) > 1 and re.fullmatch(r"[a-z][a-z-]*", words[1]):
            command.append(words[1])
        out.add(" ".join(command))
    return sorted(out)


def _subcommands() -> dict[str, set[str]]:
    """``pobox``'s subcommands and theirs, from its own parser."""
    import argparse  # noqa: PLC0415 - only here

    parser = build_parser()
    out: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested: set[str] = set()
                for inner in sub._actions:
                    if isinstance(inner, argparse._SubParsersAction):
                        nested |= set(inner.choices)
                out[name] = nested
    return out


class TestInlineCommands:
    """Commands named in the text."""

    @pytest.mark.parametrize("command", _inline_commands())
    def test_command_exists(self, command: str) -> None:
        """`pobox X [Y]` named in the README is a command pobox has."""
        words = command.split()[1:]
        commands = _subcommands()
        assert words[0] in commands, f"README names `{command}`: no such pobox command"
        if commands[words[0]] and len(words) > 1:
            assert words[1] in commands[words[0]], f"README names `{command}`"
        result = subprocess.run(
            [str(POBOX), *words[: 2 if commands[words[0]] else 1], "--help"],
            capture_output=True,
            check=False,
            timeout=60,
        )
        assert 0 == result.returncode, result.stderr


class TestLinks:
    """Relative links: they resolve to files of this repository."""

    def test_relative_links_resolve_inside_the_repository(self) -> None:
        """Every relative link of README.md names a file or folder inside the checkout."""
        text = README.read_text()
        targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text)
        relative = [t for t in targets if not re.match(r"[a-z]+:", t)]
        assert relative, "no relative links found"
        bad = [
            t
            for t in relative
            if not (ROOT / t).exists() or not (ROOT / t).resolve().is_relative_to(ROOT)
        ]
        assert [] == bad


class TestGitignore:
    """What the README's commands create is ignored by git."""

    def test_demo_folder_ignored(self) -> None:
        """./scripts/demo's folder (pobox demo's default --dir) is ignored."""
        parser = build_parser()
        demo = parser.parse_args(["demo"])
        folder = Path(demo.dir)
        result = subprocess.run(
            [need("git"), "check-ignore", "-q", str(folder / "pobox.toml")],
            cwd=ROOT,
            check=False,
        )
        assert 0 == result.returncode
