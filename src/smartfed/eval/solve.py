"""The value a program's ``solve()`` returns, run in the sandbox: the ``code`` skill and ``code_math``.

The code skill of the default benchmark (``smartfed.data.composite``) answers a
question with a Python function in one fixed form::

    def solve():
        return 68

and is scored by *running* the predicted program: ``run_solve(program)`` starts
it in ``smartfed.eval.sandbox.run_python`` (nothing a model wrote ever runs in
this process), calls ``solve()`` there and reads back ``repr`` of the result,
which must be a Python literal (a number, string, bool, None, or a tuple, list,
dict or set of them; ``ast.literal_eval`` parses it here, which evaluates
nothing). So ``return 23 + 45`` is as right as ``return 68``, and a program that
fails, loops (``SOLVE_TIMEOUT_S``), lacks ``solve`` or returns an object that is
not a literal raises ``ProgramError``.

The references are this project's own programs, ``return <literal>``:
``reference_value`` reads their literal from the syntax tree without running
anything, and runs any other reference in the sandbox like a prediction.

Programs are deterministic one-liners whose texts repeat a lot (every item whose
answer is 68 gets the same right program), so each process keeps the value of
the last ``CACHE_SIZE`` programs it ran; a timeout is never kept (a loaded
machine may slow a good program down), so that program runs again next time.
"""

from __future__ import annotations

import ast
import re
import secrets
import threading
from collections import OrderedDict

from .sandbox import run_python

SOLVE_FUNCTION = "solve"
"""The function the code skill's programs define and the scorer calls (no arguments)."""

SOLVE_TIMEOUT_S = 2.0
"""Wall-clock seconds one program may run (a one-line function needs a few hundredths, Python's start included)."""

SOLVE_MEMORY_MB = 512
CACHE_SIZE = 4096
"""Programs whose outcome a process remembers (least recently used dropped first)."""

_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)

_cache: OrderedDict[tuple[str, float], tuple[bool, object]] = OrderedDict()
_cache_lock = threading.Lock()


class ProgramError(ValueError):
    """A program that gave no value: it failed, timed out, has no ``solve`` or returned a non-literal."""


def extract_code(text: str) -> str:
    """The program in a model's answer: the first Markdown-fenced block when there is one, else the text."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def _parse_literal(text: str, what: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
        raise ProgramError(f"{what} is not a Python literal: {text[:80]!r}") from err


def _run(code: str, timeout: float) -> tuple[bool, object]:
    """``(True, value)`` or ``(False, reason)``; raises nothing.

    The value comes back on a line that starts with a mark drawn afresh for each
    run, so a program that prints a value of its own and exits cleanly before
    the report has given none.
    """
    mark = f"@@smartfed-solve-{secrets.token_hex(8)}@@"
    runner = (
        f"{code}\n\ndef __smartfed_report():\n    print({mark!r} + repr({SOLVE_FUNCTION}()))\n__smartfed_report()\n"
    )
    result = run_python(runner, timeout=timeout, memory_mb=SOLVE_MEMORY_MB)
    if not result.ok:
        last = result.stderr.strip().splitlines()[-1:] if result.stderr.strip() else []
        return False, f"{result.reason}{': ' + last[0] if last and not result.timed_out else ''}"
    lines = [line for line in result.stdout.splitlines() if line.startswith(mark)]
    if not lines:
        return False, f"{SOLVE_FUNCTION}() returned nothing (the program exited before it was called)"
    try:
        return True, _parse_literal(lines[-1][len(mark) :], f"the value {SOLVE_FUNCTION}() returned")
    except ProgramError as err:
        return False, str(err)


def run_solve(program: str, *, timeout: float | None = None) -> object:
    """Run ``program`` (fences unwrapped) in the sandbox and return what its ``solve()`` returns.

    ``timeout`` defaults to ``SOLVE_TIMEOUT_S`` (read at each call).

    Raises:
        ProgramError: the program failed (syntax error, exception, no ``solve``),
            ran past ``timeout`` seconds, or returned something whose ``repr``
            is not a Python literal. The message says which.
    """
    if not isinstance(program, str):
        raise ProgramError(f"run_solve: program must be a string, got {type(program).__name__}")
    key = (extract_code(program), float(SOLVE_TIMEOUT_S if timeout is None else timeout))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            ok, value = _cache[key]
            hit = True
        else:
            hit = False
    if not hit:
        ok, value = _run(key[0], key[1])
        if ok or not str(value).startswith("timeout"):
            with _cache_lock:
                _cache[key] = (ok, value)
                while len(_cache) > CACHE_SIZE:
                    _cache.popitem(last=False)
    if not ok:
        raise ProgramError(f"{SOLVE_FUNCTION}() gave no value: {value}")
    return value


def literal_return(program: str) -> object:
    """The value of a program that is exactly ``def solve(): return <literal>``, read without running it.

    Raises:
        ProgramError: the program has another form (then ``run_solve`` it).
    """
    try:
        tree = ast.parse(extract_code(program))
    except (SyntaxError, ValueError) as err:
        raise ProgramError(f"not a Python program: {err}") from err
    function = tree.body[0] if len(tree.body) == 1 else None
    if (
        not isinstance(function, ast.FunctionDef)
        or function.name != SOLVE_FUNCTION
        or ast.unparse(function.args)
        or function.decorator_list
        or len(function.body) != 1
        or not isinstance(function.body[0], ast.Return)
        or function.body[0].value is None
    ):
        raise ProgramError(f"not of the form 'def {SOLVE_FUNCTION}(): return <literal>'")
    try:
        return ast.literal_eval(function.body[0].value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
        raise ProgramError(
            f"the returned expression is not a literal: {ast.unparse(function.body[0].value)!r}"
        ) from err


def reference_value(program: str) -> object:
    """The value a reference program returns: its literal when it has the fixed form, else run in the sandbox."""
    try:
        return literal_return(program)
    except ProgramError:
        return run_solve(program)


def clear_cache() -> None:
    """Forget every remembered program outcome (tests; a long-lived process that wants to)."""
    with _cache_lock:
        _cache.clear()


__all__ = [
    "CACHE_SIZE",
    "SOLVE_FUNCTION",
    "SOLVE_TIMEOUT_S",
    "ProgramError",
    "clear_cache",
    "extract_code",
    "literal_return",
    "reference_value",
    "run_solve",
]
