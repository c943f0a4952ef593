import sys

from stagediff.cli import main

sys.exit(main())
