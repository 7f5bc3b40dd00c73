import sys

from p2pser.cli import main

sys.exit(main())
