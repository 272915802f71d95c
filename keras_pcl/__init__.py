"""keras_pcl: Prototypical Contrastive Learning (and MoCo) for Keras 3 / TensorFlow.

    model = keras_pcl.PCL(backbone, head, num_samples=N, num_clusters=(50, 100))
    model.compile(optimizer="sgd")
    model.fit(train_ds, epochs=..., callbacks=[keras_pcl.callbacks.PrototypeUpdate(eval_ds)])
"""

from keras_pcl import augment, backbones, callbacks, clustering, data, losses, models
from keras_pcl.callbacks import PrototypeUpdate
from keras_pcl.models import MoCo, PCL

__version__ = "0.1.0"
__all__ = ["MoCo", "PCL", "PrototypeUpdate", "augment", "backbones", "callbacks", "clustering",
           "data", "losses", "models"]
