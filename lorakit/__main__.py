import sys

from lorakit.cli.main import main

sys.exit(main())
