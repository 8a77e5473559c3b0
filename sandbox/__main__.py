"""``python -m sandbox`` (also what ``torchrun -m sandbox`` runs)."""
import sys

from sandbox.cli import main

sys.exit(main())
