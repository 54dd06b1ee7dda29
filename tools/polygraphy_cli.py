"""`polygraphy` for environments that have the package but not its console script (e.g. the devkit's py311)."""
import sys

from polygraphy.tools._main import main

if __name__ == "__main__":
    sys.argv[0] = "polygraphy"
    sys.exit(main())
