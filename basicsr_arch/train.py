"""Train DMDNet with BasicSR: ``python basicsr_arch/train.py -opt options/dmdnet.yml``.

BasicSR's usual flags work: --auto_resume, --debug, --launcher pytorch, --force_yml. A wrong
option stops the run with one line naming it (basicsr_arch/option_checks.py), not a traceback.
"""

import os.path as osp
import sys

sys.path.insert(0, osp.abspath(osp.join(__file__, osp.pardir, osp.pardir)))  # run from a checkout

from basicsr.train import train_pipeline  # noqa: E402

from basicsr_arch import run  # noqa: E402  (registers DMDNet, DMDNetModel and the datasets; applies fixes)

if __name__ == "__main__":
    run(train_pipeline)
