"""`python -m icl_circuits.cli ...` (and torchrun -m icl_circuits.cli): the same as `icl-circuits ...`."""

from . import main

raise SystemExit(main())
