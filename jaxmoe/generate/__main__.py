import sys

from jaxmoe.generate.cli import main

sys.exit(main())
