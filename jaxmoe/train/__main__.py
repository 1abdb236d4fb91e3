import sys

from jaxmoe.train.cli import main

sys.exit(main())
