"""Evaluate DMDNet with BasicSR: ``python basicsr_arch/test.py -opt options/test_dmdnet.yml``.

BasicSR's ``test_pipeline`` on paired test sets (``DMDNetPairedDataset``): PSNR, SSIM and NIQE of
the generic and the identity output (and PSNR/SSIM of the input) in the log, and the images under
``results/<name>/visualization/<test set>/``. A wrong option stops with one line naming it.
"""

import os.path as osp
import sys

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # run from a checkout without installing

from basicsr.test import test_pipeline  # noqa: E402

import basicsr_arch  # noqa: E402,F401  (registers DMDNet, DMDNetModel and the datasets; applies fixes)
from basicsr_arch.option_checks import OptionError  # noqa: E402

if __name__ == "__main__":
    try:
        test_pipeline(ROOT)
    except OptionError as exc:
        sys.exit(f"error: {exc}")
