"""fastopt: fused optimizer update kernels for training on raw arrays.

Optimizers update NumPy (CPU) or CuPy (GPU) arrays in place, in one pass over
memory per step where the math allows.  ``import fastopt`` imports neither
numba nor cupy: a backend loads on first use (see :func:`backends`).
"""

from . import functional, layers, precision, quantization, schedules
from ._backend import backends
from ._optim import (SGD, LAMB, AdaHessian, Adadelta, Adagrad, Adam, Adamax, AdamW, Lion, NAdam,
                     Newton, Optimizer, RAdam, RMSprop)
from ._optim import Muon
from ._optim import ASGD, AdaBelief, AdEMAMix, Rprop, Yogi
from ._lbfgs import LBFGS
from ._sparse import SparseAdam
from ._optim import Adafactor
from ._optim import AdamWScheduleFree, SGDScheduleFree
from ._optim import LARS
from ._pipeline import StepInfo
from ._checkpoint import load, save
from ._warmup import warmup

__version__ = "0.1.0"

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Adamax", "NAdam", "RAdam",
           "Lion", "LAMB", "AdaHessian", "Newton", "Optimizer", "StepInfo", "backends",
           "functional", "layers", "precision", "quantization", "schedules", "save", "load", "warmup",
           "__version__", "Muon"]
__all__ += ["ASGD", "Rprop", "AdaBelief", "Yogi", "AdEMAMix"]
__all__ += ["LBFGS", "SparseAdam"]
__all__ += ["Adafactor"]
__all__ += ["AdamWScheduleFree", "SGDScheduleFree"]
__all__ += ["LARS"]
