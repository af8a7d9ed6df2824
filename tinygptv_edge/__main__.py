import sys

from tinygptv_edge.cli import main

sys.exit(main())
