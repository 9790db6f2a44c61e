import sys

from synapse_msc3916.cli import main

sys.exit(main())
