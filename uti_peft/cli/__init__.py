"""The ``uti-peft`` command line: argparse, the error contract and printing; the work is done by the task modules.

Importing this module (and building the parser) imports neither torch nor transformers nor peft: each
command's options are defined in `uti_peft.cli.commands` from the light `uti_peft.constants`, and a
command's module is imported only when that command runs. So ``--help`` and ``--version`` are instant.

The error contract: a user error (a bad option, path, id or file, an unreachable or silent Hub, ...) prints
one line ``uti-peft <command>: error: …`` on stderr and exits with 2; anything else prints one line and
exits with 1. ``--debug`` (or ``UTI_PEFT_DEBUG=1``) lets the exception through, with its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import warnings
from typing import Any, Optional, Sequence

from .commands import COMMANDS

PROG = "uti-peft"
DEBUG_ENV = "UTI_PEFT_DEBUG"
DESCRIPTION = (
    "Vocabulary-extension adapters (new token rows) as a PEFT method: try it (demo), convert legacy "
    "trainable_rows.pt checkpoints, inspect, push to the Hub, evaluate and train."
)
EXIT_USER_ERROR = 2
EXIT_FAILURE = 1
# warnings our dependencies raise about each other on every run, which a user cannot act on
_DEPENDENCY_NOISE = (
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),  # peft 0.21 calling transformers 5.x
)
# exception types that are the user's to fix, by the top-level package that raises them
_USER_ERROR_PACKAGES = ("httpx", "httpx2", "huggingface_hub", "requests", "urllib3")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors follow the contract: one line, exit 2; no abbreviated options
    (``--dtyp`` is an error, not ``--dtype``: a typo must not pick an option silently)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class TopParser(Parser):
    """The ``uti-peft`` parser: an unknown option is reported by the command it was given to (``uti-peft train:
    error: unrecognized arguments: …``), and before "COMMAND required" (``uti-peft --verison``)."""

    def parse_args(  # type: ignore[override]
        self, args: Optional[Sequence[str]] = None, namespace: Any = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        command = getattr(parsed, "command", None)
        if extras:
            where = self._command_parsers().get(command, self)
            known = [o for a in where._actions for o in a.option_strings]
            guess = difflib.get_close_matches(extras[0].split("=")[0], known, n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            where.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        if command is None:
            self.error(f"a COMMAND is required: one of {', '.join(self._command_parsers())}")
        return parsed

    def _command_parsers(self) -> dict[str, argparse.ArgumentParser]:
        return dict(self._subparsers._group_actions[0].choices) if self._subparsers else {}  # type: ignore[union-attr]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default (but not ``None`` / ``False`` ones, which mean "not given")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action) or ""


def version() -> str:
    """The installed distribution's version (package metadata; nothing is imported)."""
    from importlib import metadata

    try:
        return metadata.version("uti-peft")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``uti-peft`` parser with every sub-command (no heavy import)."""
    parser = TopParser(prog=PROG, description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks (also: {DEBUG_ENV}=1)")
    # not required here: TopParser.parse_args says so itself, after reporting an unknown option
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name, help=command.help, description=command.description or command.help,
            formatter_class=HelpFormatter,
        )
        command.define(sub)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit status (0, 1 on failure, 2 on a user error)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    where = f"{PROG} {args.command}"
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(where)
        for message, category in _DEPENDENCY_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        try:
            return args.run(args) or 0
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{where}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            if debug:
                raise
            user_error = is_user_error(exc)
            hint = "" if user_error else f" (unexpected; rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
            print(f"{where}: error: {describe(exc)}{hint}", file=sys.stderr)
            return EXIT_USER_ERROR if user_error else EXIT_FAILURE


def is_user_error(exc: BaseException) -> bool:
    """Bad input, paths, files and network trouble: ValueError, OSError, and the HTTP/Hub client errors."""
    if isinstance(exc, (ValueError, OSError)):
        return True
    return any(cls.__module__.split(".")[0] in _USER_ERROR_PACKAGES for cls in type(exc).__mro__)


def describe(exc: BaseException) -> str:
    """One line saying what went wrong; network failures name the endpoint and the timeout knob."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    names = {cls.__name__ for cls in type(exc).__mro__}
    url = _request_url(exc)
    if "TimeoutException" in names:
        return (f"no answer from {url or 'the Hub'} ({type(exc).__name__}: {text}); the limit per request is "
                "HF_HUB_DOWNLOAD_TIMEOUT seconds")
    if "TransportError" in names or "ConnectionError" in names:
        return f"cannot reach {url or 'the Hub'} ({type(exc).__name__}: {text})"
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return text if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {text}"


def _request_url(exc: BaseException) -> Optional[str]:
    try:
        request = exc.request  # type: ignore[attr-defined]  # httpx errors; raises when unset
    except Exception:
        return None
    url = getattr(request, "url", None)
    return f"{url.scheme}://{url.netloc.decode()}" if hasattr(url, "netloc") else (str(url) if url else None)


def _one_line_warnings(where: str):
    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        stream = file or sys.stderr
        try:
            stream.write(f"{where}: warning: {message}\n")
        except OSError:
            pass

    return show


if __name__ == "__main__":
    sys.exit(main())
