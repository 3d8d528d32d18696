import sys

from tomtit.cli import main

sys.exit(main())
