import sys

from hvpmtl.cli import main

sys.exit(main())
