import sys

from fastmem.cli import main

sys.exit(main())
