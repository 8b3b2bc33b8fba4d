import sys

from blynk_bridge.cli import main

sys.exit(main())
