"""The sample repository the demo builds: a tiny calculator with a real test suite, and
the changes the scripted agents make to it for the three example handoffs (one of them
first breaks the suite and repairs it from the gate log)."""

from __future__ import annotations

INITIAL = {
    "README.md": "# calc\n\nA tiny calculator: `python -m calc 1 + 2`.\n",
    ".gitignore": "__pycache__/\n.pytest_cache/\n",
    "calc/__init__.py": '"""A tiny calculator."""\n',
    "calc/__main__.py": "import sys\n\nfrom calc.cli import main\n\nsys.exit(main())\n",
    "calc/errors.py": '''"""Every error the calculator reports on bad input."""


class CalcError(ValueError):
    """Bad input: the message says what was wrong."""
''',
    "calc/parser.py": '''"""Parse and evaluate "1 + 2 * 3", left to right."""

from calc import ops
from calc.errors import CalcError

OPERATORS = {"+": ops.add, "-": ops.subtract, "*": ops.multiply, "/": ops.divide}


def parse(text):
    tokens = text.split()
    if tokens[0] in OPERATORS:
        raise CalcError("an expression cannot start with an operator")
    return tokens


def evaluate(text):
    tokens = parse(text)
    total = _number(tokens[0])
    for op, value in zip(tokens[1::2], tokens[2::2]):
        if op not in OPERATORS:
            raise CalcError(f"unknown operator {op!r}")
        total = OPERATORS[op](total, _number(value))
    return total


def _number(token):
    try:
        return float(token)
    except ValueError:
        raise CalcError(f"not a number: {token!r}") from None
''',
    "calc/ops.py": '''"""The four operations, each checking its operands."""

from calc.errors import CalcError


def add(a, b):
    if not isinstance(a, (int, float)):
        raise CalcError(f"a must be a number, got {a!r}")
    if not isinstance(b, (int, float)):
        raise CalcError(f"b must be a number, got {b!r}")
    return a + b


def subtract(a, b):
    if not isinstance(a, (int, float)):
        raise CalcError(f"a must be a number, got {a!r}")
    if not isinstance(b, (int, float)):
        raise CalcError(f"b must be a number, got {b!r}")
    return a - b


def multiply(a, b):
    if not isinstance(a, (int, float)):
        raise CalcError(f"a must be a number, got {a!r}")
    if not isinstance(b, (int, float)):
        raise CalcError(f"b must be a number, got {b!r}")
    return a * b


def divide(a, b):
    if not isinstance(a, (int, float)):
        raise CalcError(f"a must be a number, got {a!r}")
    if not isinstance(b, (int, float)):
        raise CalcError(f"b must be a number, got {b!r}")
    if b == 0:
        raise CalcError("division by zero")
    return a / b
''',
    "calc/cli.py": '''"""The command line: print the value of the expression given as arguments."""

import sys

from calc.parser import evaluate


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    print(evaluate(" ".join(argv)))
    return 0
''',
    "tests/__init__.py": "",
    "tests/test_calc.py": """import unittest

from calc import ops
from calc.errors import CalcError
from calc.parser import evaluate


class CalcTest(unittest.TestCase):
    def test_left_to_right(self):
        self.assertEqual(evaluate("1 + 2 * 3"), 9)

    def test_fractions(self):
        self.assertEqual(evaluate("1.5 + 1"), 2.5)

    def test_not_a_number(self):
        with self.assertRaises(CalcError):
            evaluate("1 + x")

    def test_operands_are_checked(self):
        with self.assertRaisesRegex(CalcError, "b must be a number"):
            ops.add(1, "2")

    def test_division_by_zero(self):
        with self.assertRaisesRegex(CalcError, "division by zero"):
            evaluate("1 / 0")
""",
}

# handoff-1-critical: parse("") crashed with IndexError.
FIX_EMPTY_INPUT = {
    "calc/errors.py": INITIAL["calc/errors.py"]
    + '''

class EmptyExpressionError(CalcError):
    """The expression was empty or blank."""
''',
    "calc/parser.py": INITIAL["calc/parser.py"]
    .replace(
        "from calc.errors import CalcError\n",
        "from calc.errors import CalcError, EmptyExpressionError\n",
    )
    .replace(
        "    tokens = text.split()\n",
        "    tokens = text.split()\n"
        "    if not tokens:\n"
        '        raise EmptyExpressionError("empty expression")\n',
    ),
    "tests/test_empty.py": """import unittest

from calc.errors import EmptyExpressionError
from calc.parser import parse


class EmptyInputTest(unittest.TestCase):
    def test_empty_and_blank_input(self):
        for text in ("", "   "):
            with self.assertRaises(EmptyExpressionError):
                parse(text)
""",
}

_OPS_WITH_HELPER = '''"""The four operations, each checking its operands."""

from calc.errors import CalcError
from calc.validation import require_number


def add(a, b):
    return require_number(a, "a") + require_number(b, "b")


def subtract(a, b):
    return require_number(a, "a") - require_number(b, "b")


def multiply(a, b):
    return require_number(a, "a") * require_number(b, "b")


def divide(a, b):
    a, b = require_number(a, "a"), require_number(b, "b")
    if b == 0:
        raise CalcError("division by zero")
    return a / b
'''

_VALIDATION = '''"""The one place that says what an operand must be."""

from calc.errors import CalcError


def require_number(value, name):
    if not isinstance(value, (int, float)):
        raise CalcError(f"{{name}} must be a number, got {{value!r}}")
    return {result}
'''

# handoff-2-patterns: the first attempt truncates to int (1.5 + 1 == 2 fails the suite);
# the second attempt reads the gate log from its feedback and repairs it.
EXTRACT_PATTERN_BROKEN = {
    "calc/ops.py": _OPS_WITH_HELPER,
    "calc/validation.py": _VALIDATION.format(result="int(value)"),
}
EXTRACT_PATTERN_FIXED = {"calc/validation.py": _VALIDATION.format(result="value")}

# handoff-3-ux: one-line errors on the command line (needs handoff-1's EmptyExpressionError).
FRIENDLY_ERRORS = {
    "calc/cli.py": '''"""The command line: print the value of the expression given as arguments."""

import sys

from calc.errors import CalcError
from calc.parser import evaluate


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        print(evaluate(" ".join(argv)))
    except CalcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
''',
    "tests/test_cli.py": """import contextlib
import io
import unittest

from calc.cli import main


class CliTest(unittest.TestCase):
    def run_cli(self, *argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = main(list(argv))
        return status, err.getvalue()

    def test_empty_input(self):
        self.assertEqual(self.run_cli(""), (2, "error: empty expression\\n"))

    def test_unknown_token(self):
        status, err = self.run_cli("1", "%", "2")
        self.assertEqual(status, 2)
        self.assertIn("unknown operator", err)

    def test_division_by_zero(self):
        self.assertEqual(self.run_cli("1", "/", "0"), (2, "error: division by zero\\n"))
""",
}
