"""scripts/campaign.py under its first name, which the released models' cards and the README quote."""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.exit(runpy.run_path(str(Path(__file__).with_name("campaign.py")))["main"]())
