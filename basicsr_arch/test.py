"""Evaluate DMDNet with BasicSR: ``python basicsr_arch/test.py -opt options/test_dmdnet.yml``.

BasicSR's ``test_pipeline`` on paired test sets (``DMDNetPairedDataset``): PSNR, SSIM and NIQE of
the generic and the identity output (and PSNR/SSIM of the input) in the log, and the images under
``results/<name>/visualization/<test set>/``. A wrong option stops with one line naming it.
"""

import os.path as osp
import sys

sys.path.insert(0, osp.abspath(osp.join(__file__, osp.pardir, osp.pardir)))  # run from a checkout

from basicsr.test import test_pipeline  # noqa: E402

from basicsr_arch import run  # noqa: E402  (registers DMDNet, DMDNetModel and the datasets; applies fixes)

if __name__ == "__main__":
    run(test_pipeline)
