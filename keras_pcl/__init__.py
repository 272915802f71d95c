"""keras_pcl: Prototypical Contrastive Learning and its family for Keras 3 / TensorFlow.

    model = keras_pcl.PCL(backbone, head, num_samples=N, num_clusters=(50, 100))
    model.compile(optimizer="sgd")
    model.fit(train_ds, epochs=..., callbacks=[keras_pcl.PrototypeUpdate(eval_ds)])

Methods (`keras_pcl.models.METHODS`): MoCo, PCL, SimCLR, BYOL, SimSiam, SwAV; with labels SupCon, PaCo
and the supervised baselines.
"""

from keras_pcl import (augment, backbones, callbacks, clustering, data, distributed, errors, losses, metrics,
                       models, optimizers)
from keras_pcl.callbacks import PrototypeUpdate
from keras_pcl.errors import InvalidInputError
from keras_pcl.models import BYOL, PCL, MoCo, PaCo, SimCLR, SimSiam, SupCon, Supervised, SwAV

__version__ = "0.2.0"
__all__ = ["BYOL", "InvalidInputError", "MoCo", "PCL", "PaCo", "PrototypeUpdate", "SimCLR", "SimSiam", "SupCon",
           "Supervised", "SwAV", "augment",
           "backbones", "callbacks", "clustering", "data", "distributed", "errors", "losses", "metrics", "models",
           "optimizers"]
