"""``python -m robustbench_dyn`` runs the ``dynrobust`` command line."""

from robustbench_dyn.cli import main

main()
