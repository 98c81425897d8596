import sys

from fedxray.cli import main

sys.exit(main())
