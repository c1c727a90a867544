import sys

from vldm.paper.run import main

sys.exit(main())
