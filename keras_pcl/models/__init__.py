"""keras_pcl's methods: one shared train_step skeleton (`base`), shared pieces (`momentum`,
`queue`, `heads`), and one short subclass per method. `METHODS` maps each method's name
(the runner's `--method`) to its class."""

from keras_pcl.distributed import WorkerLostError
from keras_pcl.models import heads, momentum
from keras_pcl.models.base import METHODS, Batch, ContrastiveModel, PrototypeSpace
from keras_pcl.models.byol import BYOL
from keras_pcl.models.moco import MoCo
from keras_pcl.models.paco import PaCo
from keras_pcl.models.pcl import PCL
from keras_pcl.models.queue import KeyQueue
from keras_pcl.models.simclr import SimCLR
from keras_pcl.models.simsiam import SimSiam
from keras_pcl.models.supcon import SupCon
from keras_pcl.models.supervised import Supervised
from keras_pcl.models.swav import SwAV

__all__ = ["BYOL", "Batch", "ContrastiveModel", "KeyQueue", "METHODS", "MoCo", "PCL", "PaCo", "PrototypeSpace",
           "SimCLR", "SimSiam", "SupCon", "Supervised", "SwAV", "WorkerLostError", "heads", "momentum"]
