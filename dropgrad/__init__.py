"""DropGrad: randomly drop gradient elements before each optimizer step.

Wrap any ``torch.optim.Optimizer``::

    opt = DropGrad(torch.optim.Adam(net.parameters(), lr=1e-3), drop_rate=0.1)
"""

from .dropgrad_opt import DropGrad
from .dropgrad_scheduler import (
    CosineAnnealingDropRateScheduler,
    DropRateScheduler,
    LinearDropRateScheduler,
    StepDropRateScheduler,
)
from .functional import drop_grad, drop_grad_

__version__ = "0.5.1"

__all__ = [
    "CosineAnnealingDropRateScheduler",
    "DropGrad",
    "DropRateScheduler",
    "LinearDropRateScheduler",
    "StepDropRateScheduler",
    "__version__",
    "drop_grad",
    "drop_grad_",
]
