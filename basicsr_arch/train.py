"""Train DMDNet with BasicSR: ``python basicsr_arch/train.py -opt options/dmdnet.yml``.

BasicSR's usual flags work: --auto_resume, --debug, --launcher pytorch, --force_yml. A wrong
option stops the run with one line naming it (basicsr_arch/option_checks.py), not a traceback.
"""

import os.path as osp
import sys

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # run from a checkout without installing

from basicsr.train import train_pipeline  # noqa: E402

import basicsr_arch  # noqa: E402,F401  (registers DMDNet, DMDNetModel, DMDNetFaceDataset; applies fixes)
from basicsr_arch.option_checks import OptionError  # noqa: E402

if __name__ == "__main__":
    try:
        train_pipeline(ROOT)
    except OptionError as exc:
        sys.exit(f"error: {exc}")
