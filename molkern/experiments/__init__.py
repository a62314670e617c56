"""Experiment scripts: `python -m molkern.experiments.<name> --help`."""
