"""`python -m vldm.demo`: see vldm/demo/run.py."""

import sys

from vldm.demo.run import main

sys.exit(main())
