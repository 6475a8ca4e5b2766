import sys

from ldfix.cli import main

sys.exit(main())
