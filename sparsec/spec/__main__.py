"""`python -m sparsec.spec --docs` prints docs/spec.md; `python -m sparsec.spec SPEC` validates."""
from __future__ import annotations

import sys

from sparsec.errors import SpecError
from sparsec.spec.docs import format_summary, generate_docs
from sparsec.spec.validate import load_spec


def main(argv: list[str] | None = None) -> int:
    """`python -m sparsec.spec --docs` prints docs/spec.md; `python -m sparsec.spec SPEC` validates."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--docs"]:
        sys.stdout.write(generate_docs())
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m sparsec.spec --docs | SPEC", file=sys.stderr)
        return 2
    try:
        print(format_summary(load_spec(args[0])))
    except SpecError as error:
        print(error, file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
