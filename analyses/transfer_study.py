"""The transfer study from a script: the same as ``repsim study`` (see ``repsim study --help``).

    python analyses/transfer_study.py --data-root ../shared/data --out runs/natural --jobs 2      # preset natural
    python analyses/transfer_study.py --preset paper model=dinov2_vitb14 --data-root /data --out runs/dinov2

Re-running the same command resumes: finished runs and CKA files are reused.
"""

from __future__ import annotations

import sys

from repsim.cli import main

if __name__ == "__main__":  # the study's worker processes re-import this file: run only as a script
    sys.exit(main(["study", *sys.argv[1:]]))
