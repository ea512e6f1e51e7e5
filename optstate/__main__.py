import sys

from optstate.cli import main

sys.exit(main())
