import sys

from agora.cli import main

sys.exit(main())
