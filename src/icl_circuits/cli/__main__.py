"""`python -m icl_circuits.cli ...` (and torchrun -m icl_circuits.cli): the same as `icl-circuits ...`."""

from icl_circuits.cli import main

raise SystemExit(main())
