"""C{python -m wsgateway.config CONFIG}: the same as C{wsgateway-check CONFIG} (L{wsgateway.config.check})."""

import sys

from wsgateway.config.check import main

sys.exit(main())
