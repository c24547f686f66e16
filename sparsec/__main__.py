"""`python -m sparsec ...` runs the command line."""
import sys

from sparsec.cli import main

sys.exit(main())
